"""Judge a teacher you bring: the bar and every attack of the battery against it, with verdicts, in one command.

    python judge.py --teacher my_teacher.pth --teacher_arch resnet32x4 --threat p10 --data_root ./data
    python judge.py --teacher exps/mini/nasty_resnet20 --original exps/mini/teacher_resnet20 --name nasty \\
        --threat p2 --data_root ./data

The teacher is a checkpoint of this project or of another codebase (RepDistiller/mdistiller, Nasty-Teacher,
pytorch-cifar, a plain state dict, a `module.` prefix: utils/foreign.py); where the file does not say its
architecture or normalisation, --teacher_arch, --teacher_mean and --teacher_std do. A checkpoint of a run that
did not finish is refused unless --allow_unfinished_teacher. With --original (the undefended model it came
from) the report shows the accuracy cost and how far the teacher answers from it, and the original is attacked
as well, as in reproduce.py's grid. --wrap puts training-free defences (stingy, posthoc) around the teacher and
judges them too.

For each threat model of the preset (--threat, docs/METHOD.md section 10; none: the preset's own student arms)
the thief's students are trained exactly as reproduce.py's grid trains them (the same step configs, the same
seeds and the same class-balanced images), so a teacher of the grid brought here gets the grid's verdicts:

    OUT/teachers/<name>/          the teacher, scored (import_teacher.py); OUT/teachers/original, the original
    OUT/<threat>/                 its students, results.md/json and figures (report.py OUT/<threat> rebuilds them)
    OUT/summary.md                with two threat models or more: the strongest attack per threat model

Like reproduce.py it resumes: finished steps are skipped, interrupted ones continue (--dry_run lists them).
"""
import os
import re
import sys
import time

import reproduce
from import_teacher import file_sha256, load_teacher
from utils.checkpoint import WEIGHTS_FILE
from utils.config import Parser
from utils.constants import DATASETS
from utils.defences import DEFENCES
from utils.errors import UserError, cli_main

WRAPPABLE = tuple(name for name, d in DEFENCES.items() if not d.trained and not d.needs_key)


def _floats(text, flag):
    if text is None:
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise UserError(f"{flag} must be 3 comma-separated numbers, one per colour channel, e.g. "
                        f"0.4914,0.4822,0.4465; got '{text}'")
    return values


def _names(text, allowed, flag):
    names = [n for n in (text or "").split(",") if n]
    for n in names:
        if n not in allowed:
            raise UserError(f"{flag}: '{n}' is not one of {', '.join(allowed) or 'none'}")
    return names


def parse_args(argv=None):
    parser = Parser(prog="judge.py", description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher's checkpoint file (or a finished run folder)")
    parser.add_argument("--name", default="yours",
                        help="the teacher's name in folders and tables (letters, digits, '-'; default yours)")
    parser.add_argument("--teacher_arch", default="", help="its architecture, when the file does not say it "
                        "(the zoo's name or RepDistiller's: python train_scratch.py --list-models)")
    parser.add_argument("--teacher_mean", default=None, help="its input normalisation mean, 3 comma-separated "
                        "numbers, when it is not the dataset's")
    parser.add_argument("--teacher_std", default=None, help="its input normalisation std (see --teacher_mean)")
    parser.add_argument("--allow_unfinished_teacher", action="store_true",
                        help="accept a checkpoint of a run that did not finish")
    parser.add_argument("--original", default="", help="optional: the undefended model the teacher came from")
    parser.add_argument("--original_arch", default="", help="the original's architecture, when its file does not say")
    parser.add_argument("--wrap", default="", help=f"training-free defences around the teacher to judge too, "
                        f"comma-separated ({', '.join(WRAPPABLE)})")
    parser.add_argument("--preset", choices=sorted(reproduce.PRESETS), default="mini",
                        help="the students' settings and threat models (default mini)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                        help="the dataset the teacher was trained on (default: the preset's)")
    parser.add_argument("--threat", default=None,
                        help="threat model(s) of the preset, comma-separated (mini: full, p10, p10nl, p2, p2nl); "
                             "default: the preset's own student arms (all labelled images, its short schedule)")
    parser.add_argument("--student", default=None, help="student architecture(s), comma-separated (default: "
                        "the preset's)")
    parser.add_argument("--seeds", default=None, help="student seeds, e.g. 0,1,2 (default: the preset's)")
    parser.add_argument("--out", default=None, help="output folder (default exps/judge_<name>)")
    parser.add_argument("--data_root", default="./data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="steps run at once (as reproduce.py --jobs)")
    parser.add_argument("--no_battery", action="store_true",
                        help="train every KD student in its own process (default: one battery per teacher and seed)")
    parser.add_argument("--dry_run", action="store_true", help="list the steps and their state, run nothing")
    return parser.parse_args(argv)


def check_teacher(path, what, dataset, arch="", mean=None, std=None, allow_unfinished=False):
    """Load a brought file as import_teacher.py will, before anything is written: (resolved path, its arch)."""
    path, _, ckpt = load_teacher(path, what, dataset, arch=arch or None, mean=mean or None, std=std or None,
                                 allow_unfinished=allow_unfinished)
    return os.path.abspath(path), ckpt["arch"]


def plan(args):
    """(teacher steps, {teacher name: weights relative to OUT/teachers}, the teachers' architecture)."""
    p = reproduce.PRESETS[args.preset]
    dataset = args.dataset or p["dataset"]
    if not re.fullmatch(r"[A-Za-z0-9-]+", args.name) or args.name == "original":
        raise UserError(f"--name must be letters, digits and '-' and not 'original', got '{args.name}'")
    wraps = _names(args.wrap, WRAPPABLE, "--wrap")
    mean, std = _floats(args.teacher_mean, "--teacher_mean"), _floats(args.teacher_std, "--teacher_std")
    source, arch = check_teacher(args.teacher, "teacher", dataset, args.teacher_arch, mean, std,
                                 args.allow_unfinished_teacher)
    steps, ckpt = [], {}

    def imported(name, role, path, extra):
        return {"name": name, "script": "import_teacher.py", "role": role,
                "comment": f"Step of judge.py: the {name} teacher brought from {path}, scored (nothing is trained).",
                "params": dict(dataset=dataset, seed=0, source=path, source_sha256=file_sha256(path), **extra)}

    if args.original:
        original, original_arch = check_teacher(args.original, "original", dataset, args.original_arch)
        steps.append(imported("original", {"kind": "teacher", "teacher": "original", "loads": {}}, original,
                              {"teacher_arch": args.original_arch} if args.original_arch else {}))
        ckpt["original"] = f"original/{WEIGHTS_FILE}"
    keys = {k: v for k, v in (("teacher_arch", args.teacher_arch), ("teacher_mean", mean), ("teacher_std", std),
                              ("allow_unfinished_teacher", args.allow_unfinished_teacher)) if v}
    if args.original:
        keys["original"] = ckpt["original"]
    steps.append(imported(args.name, {"kind": "teacher", "teacher": args.name,
                                      "loads": {"original": "original"} if args.original else {}}, source, keys))
    ckpt[args.name] = f"{args.name}/{WEIGHTS_FILE}"
    for w in wraps:
        name = f"{w}-{args.name}"
        steps.append({"name": name, "script": "train_possessive.py",
                      "role": {"kind": "teacher", "teacher": name, "loads": {"original": args.name}},
                      "comment": f"Step of judge.py: the {args.name} teacher answering through the training-free "
                                 f"{w} defence (nothing is trained).",
                      "params": dict(p["train"], dataset=dataset, seed=0, model=arch, method=w,
                                     original=ckpt[args.name], **reproduce.defence_params(p, w, dataset))})
        ckpt[name] = f"{name}/{WEIGHTS_FILE}"
    return steps, ckpt, dataset


def student_steps(preset, dataset, seeds, ckpt, threat, students=None):
    """The students judge.py trains against the teachers of `ckpt` ({name: weights relative to OUT/teachers}) at
    one threat model (None: the preset's own arms, with DFAD): reproduce.py's grid's steps, by the same function."""
    dfad = [] if threat else list(ckpt)
    # a label-free threat model's label-smoothing and hard-label students are its labelled twin's, in
    # OUT/<twin> (reproduction.plan: twin_folder)
    twin = reproduce.threat_model(preset, threat).get("twin") if threat else None
    return reproduce.student_steps(preset, dataset, seeds, ckpt, threat=threat, dfad_teachers=dfad, students=students,
                                   twin_folder=twin)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    threats = [t for t in (args.threat or "").split(",") if t] or [None]
    for t in threats:
        if t is not None:
            reproduce.threat_model(args.preset, t)
    p = reproduce.PRESETS[args.preset]
    students = [s for s in (args.student or "").split(",") if s] or None
    import models
    for s in students or []:
        if s not in models.names():
            raise UserError(f"--student: '{s}' is not in the zoo (python train_scratch.py --list-models)")
    seeds = reproduce.parse_seeds(args.seeds, p.get("seeds", (0,)))
    if not args.dry_run and not os.path.isdir(args.data_root):
        raise UserError(f"data_root '{args.data_root}' does not exist; pass --data_root pointing at your dataset copy")
    teacher_steps, ckpt, dataset = plan(args)
    out = args.out or os.path.join("exps", f"judge_{args.name}")
    teachers_root = os.path.join(out, "teachers")
    folders = []
    for threat in threats:
        t0 = time.time()
        exp_root = os.path.join(out, threat or "default")
        steps = teacher_steps + student_steps(args.preset, dataset, seeds, ckpt, threat, students)
        manifest = {"preset": args.preset,
                    "judge": {"teacher": os.path.abspath(args.teacher), "name": args.name,
                              "original": os.path.abspath(args.original) if args.original else None}}
        if threat:
            record = reproduce.threat_record(args.preset, threat)
            if not args.original:  # no original: the floor is the judged teacher's own argmax
                record["floor_teacher"] = args.name
            manifest.update(threat=record)
        manifest["teachers_from"] = os.path.relpath(teachers_root, exp_root)
        print(f"== {args.name}: threat model {threat or 'none (the preset’s student arms)'} -> {exp_root}",
              flush=True)
        todo = reproduce.run_plan(steps, steps, exp_root, teachers_root, manifest, args.data_root, device=args.device,
                                  jobs=args.jobs, dry_run=args.dry_run, battery=not args.no_battery)
        if args.dry_run:
            continue
        import report
        report.build(exp_root, extra={"reproduce_wall_time_s": round(time.time() - t0, 1), "jobs": args.jobs}
                     if todo else None)
        folders.append(exp_root)
        print(f"verdicts for threat model {threat or 'none'}: {os.path.join(exp_root, 'results.md')}", flush=True)
    if len(folders) > 1 and all(threats):
        import report
        report.threat_summary(out, folders)
        print(f"summary over the threat models: {os.path.join(out, 'summary.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
