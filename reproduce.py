"""One command for the paper's claim: original -> possessive (RML) and Nasty teachers -> every attack.

    python reproduce.py --preset mini --data_root ./data            # CPU scale
    python reproduce.py --preset paper --data_root ./data           # GPU scale (paper settings)
    python reproduce.py --preset mini --download                    # fetch CIFAR-10 into ./data first
    python reproduce.py --preset mini --threat p10 --data_root ./data  # a thief with 10% of the images
    python reproduce.py --schedule mini_long --data_root ./data     # a committed experiment beyond the grid

The parts are in reproduction/: presets.py (scale, seeds, threat models), plan.py (the steps), schedules.py
(the committed experiments beyond the grid), state.py (is a step's folder done?), jobs.py (running them).

Each step is the real script (train_scratch.py, train_possessive.py, train_kd.py, train_dfad.py) run on its
own folder exps/<preset>/<step>/ (params.json written there). A finished step (metrics.json, or sweep.json
for a tau sweep, matching the step's config) is skipped; an interrupted one resumes from its last.pth, so
after a crash the same command loses at most the current epoch; a sweep whose runs were trained one by one
into its tau_<tau>/ folders resumes too (it reuses them and picks). At the end report.py writes
exps/<preset>/results.md, results.json and the figures.

--jobs N runs up to N steps at once, each as its own process, as soon as the teachers it loads are done
(on CPU the cores are shared out with OMP_NUM_THREADS, and a step that starts while fewer can run gets the
idle slots' cores too; with several GPUs each job slot gets its own GPU). A step's output then goes to
<step>/run.log (a battery's to its first student's folder).

The KD students of one teacher and seed are trained as one battery (train_kd.py --battery): one pass over
the data, one teacher forward per batch for all of them, each student still in its own folder with the result
its lone run gives. --no_battery trains each in its own process.
"""
import argparse
import os
import sys
import time

from utils.checkpoint import atomic_write_text, read_json
from utils.config import CHOICES, Parser, close_match
from utils.defences import DATASET_TAU, DEFENCES
from utils.errors import UserError, cli_main

# The reproduction's parts, importable from here as before (judge.py, bench/cuda_check.py and the tests use them).
from reproduction.jobs import batteries, job_env, job_names, run_plan, run_step  # noqa: F401
from reproduction.plan import dependencies, describe, plan, student_steps  # noqa: F401
from reproduction.presets import (CHECKPOINT_KEYS, P2_EPOCHS, P10_EPOCHS, PRESETS, battery_attacks,  # noqa: F401
                                  battery_teachers, defence_params, grid_teachers, seeded, threat_folder, threat_model,
                                  threat_record, twin_folder)
from reproduction.schedules import SCHEDULES, schedule_plan
from reproduction.state import finished_record, step_state, weights_digest, write_params  # noqa: F401


def fetch_dataset(dataset, root):
    """Download (if missing) and check both splits here, once, so parallel steps never race on the folder."""
    from utils.data import load_split
    os.makedirs(root, exist_ok=True)
    for train in (True, False):
        load_split(dataset, root, train, download=True)


def _flag(text):
    low = text.lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
    return low in ("true", "1", "yes")


def parse_seeds(text, default=(0,)):
    if text is None:
        return list(default)
    try:
        seeds = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        seeds = []
    if not seeds or any(seed < 0 for seed in seeds):
        raise UserError(f"--seeds must be a comma-separated list of seeds >= 0, e.g. 0,1,2; got '{text}'")
    return seeds


def _parse_defences(text):
    names = [n for n in (text or "").split(",") if n]
    for name in names:
        if name not in DEFENCES:
            raise UserError(f"--defences: unknown defence '{name}'; registered: {', '.join(DEFENCES)}")
    return names



def build_parser():
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the scale of every step (default mini)")
    parser.add_argument("--dataset", choices=sorted(DATASET_TAU), default=None,
                        help="override the preset's dataset (cifar10, cifar100, tinyimagenet)")
    parser.add_argument("--data_root", default="./data")
    parser.add_argument("--download", nargs="?", const="true", default="false", type=_flag, metavar="true/false",
                        help="fetch the dataset into --data_root first if it is missing (once, before any step); "
                             "given alone it means true, as in the training scripts")
    parser.add_argument("--exp_root", default=None,
                        help="default: exps/<preset> (exps/<preset>_<dataset> if --dataset)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", default=None,
                        help="run only the steps whose name contains this text (or one of several, comma-separated: "
                             "ls_cnn,kd_vanilla_nasty_cnn)")
    parser.add_argument("--dry_run", action="store_true",
                        help="list the steps and their state, run nothing (needs no data)")
    parser.add_argument("--compare", metavar="REF", default=None,
                        help="at the end, write EXP_ROOT/comparison.md: every row beside the same row of REF (e.g. "
                             "the committed exps/mini, when --exp_root puts this run elsewhere)")
    parser.add_argument("--seeds", default=None,
                        help="student seeds, e.g. 0,1,2: every student arm and DFAD is trained once per seed (teachers "
                             "once); the steps of seeds already in EXP_ROOT/steps.json are kept, for the rows that "
                             "hold them (default: the preset's, 0,1,2 for mini and paper and 0 for tiny, plus those); "
                             "with --only, a seed beyond the preset's joins the plan for the named rows alone")
    parser.add_argument("--defences", default=None,
                        help="also screen these registered defences outside the default battery, e.g. keyed,keyedflat: "
                             "every attack against them, first seed only; kept in EXP_ROOT/steps.json, so later runs "
                             "and the report keep them too")
    parser.add_argument("--amp", choices=CHOICES["amp"], default=None,
                        help="precision of the student steps (every arm and DFAD, every seed): off trains them in "
                             "fp32, e.g. to time a seed on a machine without fast bf16 (default: the preset's, auto); "
                             "teachers keep the preset's")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                        help="rebuild a committed experiment beyond the grid (reproduction/schedules.py): "
                             + "; ".join(f"{n}: {s['title']}" for n, s in SCHEDULES.items()))
    parser.add_argument("--threat", default=None, metavar="NAME",
                        help="train the student arms of this threat model of the preset (what the thief holds: "
                             "mini has full, p10, p10nl, p2, p2nl; METHOD.md section 10) into exps/<preset>_<NAME>, "
                             "against the teachers of exps/<preset> (trained there first if missing)")
    parser.add_argument("--teachers_from", default=None, metavar="DIR",
                        help="with --threat: the preset folder whose teachers are attacked (default exps/<preset>)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="steps run at once, each in its own process (default 1: one after another, "
                             "in this process)")
    parser.add_argument("--no_battery", action="store_true",
                        help="train every KD student in its own process; by default the students of one teacher and "
                             "seed are trained together, one teacher forward per batch for all (train_kd.py --battery)")
    parser.add_argument("--cost", metavar="FILE", default=None,
                        help="with --dry_run: projected device-hours per step and in all, from the epoch times in FILE "
                             "(the epoch_times.json of bench/cuda_check.py), or from the finished runs of a folder "
                             "(e.g. exps/threat_p2: what is left, at the pace they kept); see utils/cost.py")
    return parser


# What a schedule fixes itself: these options go with a preset run only.
PRESET_ONLY = ("preset", "dataset", "seeds", "defences", "amp", "threat", "compare")


def check(args):
    """One line and exit 2 for options that do not fit together or do not hold."""
    if args.schedule:
        given = [f"--{k}" for k in PRESET_ONLY if getattr(args, k) is not None]
        if given:
            raise UserError(f"--schedule {args.schedule} fixes its own {', '.join(given)}: "
                            f"drop {'it' if len(given) == 1 else 'them'} "
                            f"(python reproduce.py --schedule {args.schedule} --dry_run lists its runs)")
    if args.cost and not args.dry_run:
        raise UserError("--cost projects the device time of the steps and runs nothing: add --dry_run")
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    if args.compare and not os.path.isfile(os.path.join(args.compare, "steps.json")):
        raise UserError(f"--compare {args.compare}: no steps.json there; pass a preset folder written by reproduce.py, "
                        f"e.g. exps/mini")
    if args.teachers_from and not (args.threat or args.schedule):
        raise UserError("--teachers_from goes with --threat or --schedule (students against another folder's teachers)")
    if not args.dry_run and not args.download and not os.path.isdir(args.data_root):
        raise UserError(f"data_root '{args.data_root}' does not exist; pass --data_root pointing at your dataset copy")


def named(step, only):
    """Whether --only names the step: its name contains `only` or one of its comma-separated parts (None: every
    step)."""
    parts = [part for part in (only or "").split(",") if part]
    if only and not parts:
        raise UserError(f"--only {only!r} names no step; give part of a step name, or several separated by commas")
    return not parts or any(part in step["name"] for part in parts)


def select(steps, only, seeds=None):
    """The steps to bring up to date: those whose name contains `only` (or one of its comma-separated parts),
    teachers and students of `seeds`."""
    chosen = [s for s in steps if named(s, only)
              and (seeds is None or s["role"]["kind"] == "teacher" or s["role"].get("seed", 0) in seeds)]
    if not chosen:
        hint = close_match(only, [s["name"] for s in steps]) if only else ""
        raise UserError(f"--only {only!r} matches none of the {len(steps)} steps{hint}; give part of a step name "
                        f"(add --dry_run to list them)")
    return chosen


def preset_steps(args):
    """(steps, selected, exp_root, teachers_root, manifest) of a preset run (with --threat, a threat model's)."""
    preset = args.preset
    preset_root = os.path.join("exps", preset if not args.dataset else f"{preset}_{args.dataset}")
    threat = threat_model(preset, args.threat) if args.threat else None
    if threat is None:
        exp_root = teachers_root = args.exp_root or preset_root
    else:
        exp_root = args.exp_root or os.path.join("exps", threat_folder(preset, args.threat))
        teachers_root = args.teachers_from or preset_root
    # a label-free threat model's arms that read no label are its twin's runs, in the twin's folder beside this one
    # (plan: twin_folder), as are the runs another experiment trained first (presets: trained_in); with --exp_root
    # where those folders are is not known, so they train here
    twin = twin_folder(preset, args.threat) if threat and not args.exp_root else None
    seeds = parse_seeds(args.seeds, PRESETS[preset].get("seeds", (0,)))
    old = read_json(os.path.join(exp_root, "steps.json"))
    old_steps = old["steps"] if isinstance(old, dict) and "steps" in old else []
    known = sorted({s["role"].get("seed", 0) for s in old_steps})
    screened = _parse_defences(args.defences)
    screened += [s["role"]["teacher"] for s in old_steps  # defences screened before stay in the plan
                 if s["role"].get("kind") == "teacher" and s["role"]["teacher"] in DEFENCES
                 and s["role"]["teacher"] not in grid_teachers(PRESETS[preset], args.threat, screened)]
    steps = plan(preset, args.dataset, sorted(set(seeds) | set(known)), screened, args.amp, args.threat,
                 twin_folder=twin, siblings=threat is not None and not args.exp_root)
    # a seed the folder holds for some rows alone (e.g. two more seeds of one arm, to settle its verdict) stays in
    # the plan for those rows, not for every arm; the preset's seeds and those of --seeds are every arm's, but a
    # seed asked for with --only is the named rows' alone (it does not enter steps.json for every other arm)
    every_arm = set(PRESETS[preset].get("seeds", (0,))) | (set() if args.only else set(seeds))
    had = {s["name"] for s in old_steps}
    steps = [s for s in steps if s["role"]["kind"] == "teacher" or s["role"].get("seed", 0) in every_arm
             or s["name"] in had or (s["role"].get("seed", 0) in seeds and named(s, args.only))]
    run_seeds = set(seeds) if args.seeds is not None else set(seeds) | set(known)
    manifest = {"preset": preset}
    if threat is not None:
        manifest.update(threat=threat_record(preset, args.threat),
                        teachers_from=os.path.relpath(teachers_root, exp_root))
    return steps, select(steps, args.only, run_seeds), exp_root, teachers_root, manifest


def schedule_steps(args):
    """(steps, selected, exp_root, teachers_root, manifest) of a schedule: its runs against its preset's teachers."""
    sched = SCHEDULES[args.schedule]
    exp_root = args.exp_root or os.path.join("exps", sched["root"])
    teachers_root = args.teachers_from or os.path.join("exps", sched["preset"])
    steps = schedule_plan(args.schedule)
    manifest = {"preset": sched["preset"], "schedule": args.schedule,
                "teachers_from": os.path.relpath(teachers_root, exp_root)}
    if sched.get("threat"):
        manifest["threat"] = threat_record(sched["preset"], sched["threat"])
    return steps, select(steps, args.only), exp_root, teachers_root, manifest


def rebuild_report(args, exp_root, todo, seconds):
    """The report of what ran: a preset folder's results.md (and comparison.md with --compare); a schedule's as
    the schedule says (a curve, or results.md compared with its preset's)."""
    import report
    spec = SCHEDULES[args.schedule]["report"] if args.schedule else {"compare": args.compare}
    if "curve" in spec:
        report.curve(exp_root, [os.path.join("exps", other) for other in spec["curve"]])
        return os.path.join(exp_root, "curve.md")
    if spec.get("screen"):
        report.screen(exp_root)
        return os.path.join(exp_root, "screen.md")
    if args.schedule and not spec:
        return exp_root  # its runs' own metrics.json are the result
    if not todo:  # nothing ran: the wall time of the last run that trained something still describes the folder
        extra = None
    elif not args.only:
        extra = {"reproduce_wall_time_s": round(seconds, 1), "jobs": args.jobs}
    else:  # a partial run: the last full run's wall time no longer describes the folder
        extra = {"reproduce_wall_time_s": None, "jobs": None}
    res = report.build(exp_root, extra=extra)
    if spec.get("compare"):
        ref = spec["compare"] if not args.schedule else os.path.join("exps", spec["compare"])
        text = report.comparison(res, report.collect(ref), exp_root, ref)
        atomic_write_text(os.path.join(exp_root, "comparison.md"), text)
        print(text, end="")
    return os.path.join(exp_root, "results.md")


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    check(args)
    from reproduction.state import epoch_times_of
    from utils.cost import projection_text
    epoch_times = epoch_times_of(args.cost) if args.cost else None
    if args.schedule:
        steps, selected, exp_root, teachers_root, manifest = schedule_steps(args)
    else:
        args.preset = args.preset or "mini"
        steps, selected, exp_root, teachers_root, manifest = preset_steps(args)
    if args.download and not args.dry_run:
        fetch_dataset(args.dataset or PRESETS[manifest["preset"]]["dataset"], args.data_root)
    t0 = time.time()
    todo = run_plan(steps, selected, exp_root, teachers_root, manifest, args.data_root, device=args.device,
                    jobs=args.jobs, dry_run=args.dry_run, battery=not args.no_battery)
    if args.dry_run:
        if epoch_times is not None:  # what is left to train: the steps not done
            print(projection_text(todo, epoch_times, args.cost), end="")
        return 0
    total = time.time() - t0
    where = rebuild_report(args, exp_root, todo, total)
    print(f"all {len(selected)} steps done in {total / 60:.1f} min; results in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
