"""The report of a reproduction, rebuilt from its run folders alone (report.py is the command line).

    collect      a preset folder's results: accuracies, seeds, provenance, verdicts
    verdicts     the bar of a threat model, the strongest attack on each teacher, the data-free claim
    tables       results.md, a piece per section (cells: the cells every table shares; names: teachers)
    figures      the figures, one function each
    build        results.json, results.md and the figures of a preset folder
    comparison   a run's rows beside a reference folder's
    curves       convergence and schedule tables of a curve folder
    threats      the teacher x threat model summary
    screen       the tables of a screening schedule (teachers fine-tuned with other settings, their students)
"""
