"""Rebuild a reproduction's results table and figures from its run folders alone.

    python report.py exps/mini
    python report.py runs/mini --compare exps/mini      # a re-run beside the committed figures
    python report.py exps/mini_curve --curve --with exps/mini   # convergence: accuracy against epochs


Reads exps/<preset>/steps.json (written by reproduce.py) and each step's metrics.json / sweep.json; writes
results.md (the table of docs/METHOD.md section 5), results.json and PNG figures beside them.
A stolen student counts as *distillable* when it beats the label-smoothing student of the same
architecture (the bar of Markov KD and CMIM), *KD-resistant* otherwise.

This file is the command line; the report itself is the package reporting/, a module per part.
"""
import os
import sys

from reporting.build import build
from reporting.cells import below_cell
from reporting.collect import collect, provenance, total_seconds
from reporting.comparison import comparison, rows
from reporting.curves import curve, schedule, schedule_frontier
from reporting.figures import accuracy_bars, figures
from reporting.screen import screen
from reporting.names import TEACHER_NAMES
from reporting.tables import markdown
from reporting.threats import threat_summary
from reporting.verdicts import BAR_NAMES, dfad_against_original, frontier, hard_label_floor
from utils.checkpoint import atomic_write_text
from utils.errors import UserError, cli_main

# The report's functions live in reporting/; these names stay importable from here for the callers that use
# them as report.<name> (reproduce.py, the tests), the last three also under the names they had here.
__all__ = ["BAR_NAMES", "TEACHER_NAMES", "accuracy_bars", "build", "collect", "comparison", "curve", "figures",
           "frontier", "hard_label_floor", "main", "markdown", "provenance", "rows", "schedule", "schedule_frontier",
           "screen", "threat_summary", "below_cell", "dfad_against_original", "total_seconds",
           "_below_cell", "_dfad_against_original", "_total_seconds"]
_below_cell, _dfad_against_original, _total_seconds = below_cell, dfad_against_original, total_seconds


@cli_main
def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("exp_root", help="a preset folder written by reproduce.py, e.g. exps/mini")
    parser.add_argument("--compare", metavar="REF", default=None,
                        help="another preset folder (e.g. the committed exps/mini): write EXP_ROOT/comparison.md "
                             "with every row beside REF's and the difference")
    parser.add_argument("--strict", action="store_true",
                        help="refuse (exit 2) when a row was trained from other weights than its teacher's")
    parser.add_argument("--curve", action="store_true",
                        help="EXP_ROOT holds runs of a few arms at several epoch counts: write curve.md, curve.json "
                             "and fig_convergence.png (final accuracy against epochs) instead of the results table")
    parser.add_argument("--with", dest="others", nargs="+", default=[], metavar="FOLDER",
                        help="with --curve: more points of the same arms from these folders (e.g. exps/mini)")
    parser.add_argument("--threats", nargs="+", default=None, metavar="FOLDER",
                        help="write EXP_ROOT/summary.md, summary.json and fig_threats.png: each teacher's strongest "
                             "attack in each of these threat-model folders (reproduce.py --threat)")
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; usage: python report.py "
                                                                   f"exps/<preset> [--compare REF] [--strict]"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threats:
        for folder in args.threats:
            if not os.path.isfile(os.path.join(folder, "steps.json")):
                raise UserError(f"--threats {folder}: no steps.json there; "
                                "pass folders written by reproduce.py --threat")
        threat_summary(args.exp_root, args.threats)
        print(open(os.path.join(args.exp_root, "summary.md")).read(), end="")
        return 0
    for folder in (args.exp_root, args.compare):
        if folder is not None and not os.path.isdir(folder):
            raise UserError(f"{folder} is not a folder; pass a preset folder, e.g. exps/mini")
    if args.curve:
        for folder in args.others:
            if not os.path.isdir(folder):
                raise UserError(f"--with {folder} is not a folder")
        curve(args.exp_root, args.others)
        print(open(os.path.join(args.exp_root, "curve.md")).read(), end="")
        return 0
    res = build(args.exp_root, strict=args.strict)
    print(f"wrote {os.path.join(args.exp_root, 'results.md')}, results.json and figures")
    if args.compare:
        text = comparison(res, collect(args.compare), args.exp_root, args.compare)
        atomic_write_text(os.path.join(args.exp_root, "comparison.md"), text)
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
