"""One command for the paper's claim: original -> possessive (RML) and Nasty teachers -> every attack.

    python reproduce.py --preset mini --data_root ./data            # CPU scale
    python reproduce.py --preset paper --data_root ./data           # GPU scale (paper settings)
    python reproduce.py --preset mini --download                    # fetch CIFAR-10 into ./data first

Each step is the real script (train_scratch.py, train_possessive.py, train_kd.py, train_dfad.py) run on its
own folder exps/<preset>/<step>/ (params.json written there). A finished step (metrics.json, or sweep.json
for a tau sweep, matching the step's config) is skipped; an interrupted one resumes from its last.pth, so
after a crash the same command loses at most the current epoch. At the end report.py writes
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
import importlib
import json
import os
import subprocess
import sys
import time

from utils.checkpoint import (WEIGHTS_FILE, atomic_write_json, atomic_write_text, checkpoint_digest, load_checkpoint,
                              read_json)
from utils.config import CHOICES, Parser, changed_result_key, close_match
from utils.attacks import ATTACKS
from utils.defences import DATASET_TAU, DEFENCES, key_problem
from utils.engine import catch_stop_signals
from utils.errors import UserError, cli_main

# Params that name another step's checkpoint ("<step>/weights.pth", relative to the preset folder): the
# weights-only file a finished run leaves, which is also what a released teacher ships.
CHECKPOINT_KEYS = ("original", "teacher")


# Student epochs of the threat models, chosen by the doubling rule on their curves (exps/threat_curve,
# docs/RESULTS.md): label smoothing is flat at 120 epochs on 5,000 images and at 150 on 1,000; vanilla KD from the
# original, the slower arm, at 240 (+0.70 to 480) and at 1200 (+0.33 to 2400).
P10_EPOCHS = 240
P2_EPOCHS = 1200


def battery_teachers(extra=()):
    """The teachers every attack is run against: the original, then each defence of the registry's battery,
    then the defences outside it asked for (`extra`: reproduce.py --defences, e.g. variants being screened)."""
    names = ["original"] + [name for name, d in DEFENCES.items() if d.battery]
    return names + [name for name in extra if name not in names]


def battery_attacks():
    """The attacks of the registry that the battery runs against every teacher."""
    return [name for name, a in ATTACKS.items() if a.battery]


PRESETS = {
    # Seconds per step on generated data: the test suite runs the whole chain with it.
    "tiny": {
        "dataset": "cifar10", "teacher_model": "cnn", "students": ["cnn_small"], "dfad_student": "cnn_small",
        "train": {"batch_size": 20, "eval_batch_size": 50, "amp": "off", "log_every": 5},
        "teacher": {"epochs": 2, "lr": 0.05},
        "possessive": {"epochs": 1, "lr": 0.02, "init_from_original": True},
        "student": {"epochs": 1, "lr": 0.05},
        "taus": [4.0],
        "dfad": {"epochs": 1, "iters_per_epoch": 2, "k": 2, "batch_size": 16, "lr": 0.05},
        "threats": {
            "s50": {"title": "50 labelled images", "subset": 50, "labels": True, "student": {"epochs": 2}},
            "s50nl": {"title": "50 images, no labels", "subset": 50, "labels": False, "student": {"epochs": 2}},
        },
    },
    # CPU scale (2 cores): METHOD.md section 6 settings for the teachers; students and the thief's tau cut
    # so a seed of the battery fits an afternoon with --jobs 2 (README).
    "mini": {
        "dataset": "cifar10", "teacher_model": "resnet20", "students": ["cnn"], "dfad_student": "resnet8",
        "train": {"batch_size": 128, "optimizer": "sgd", "nesterov": True, "weight_decay": 5e-4,
                  "schedule": "onecycle"},
        "teacher": {"epochs": 12, "lr": 0.2},
        "possessive": {"epochs": 3, "lr": 0.05, "init_from_original": True},
        # RML's own settings over "possessive": chosen by the sweep in exps/mini/rml_sweep (README).
        "rml": {"lr": 0.01, "beta": 0.3},
        "student": {"epochs": 3, "lr": 0.05},
        "seeds": [0, 1, 2],  # METHOD.md section 8: a verdict needs n >= 3
        "taus": [4.0],
        # DFAD: 8 epochs of 50 generator iterations at a constant lr (milestone at the end), the budget where
        # the student of the original passes 40% (exps/mini_dfad_curve, README); about 12 min a run, one thread
        "dfad": {"epochs": 8, "iters_per_epoch": 50, "k": 5, "batch_size": 128, "lr": 0.1,
                 "schedule": "step", "milestones": [8]},
        # The thief's threat models (METHOD.md section 10): reproduce.py --threat NAME trains the student arms
        # into exps/mini_<NAME> (the full-data one into exps/mini_long), against the teachers of exps/mini.
        # Each schedule is the one chosen by the doubling rule on its own curve (exps/threat_curve).
        "threats": {
            "full": {"title": "all 50,000 labelled images", "subset": 0, "labels": True, "root": "mini_long",
                     "suffix": "_e24", "student": {"epochs": 24}},
            "p10": {"title": "5,000 labelled images (10%)", "subset": 5000, "labels": True,
                    "student": {"epochs": P10_EPOCHS, "eval_every": 10}},
            "p10nl": {"title": "5,000 images (10%), no labels", "subset": 5000, "labels": False,
                      "student": {"epochs": P10_EPOCHS, "eval_every": 10}},
            "p2": {"title": "1,000 labelled images (2%)", "subset": 1000, "labels": True,
                   "student": {"epochs": P2_EPOCHS, "eval_every": 50}},
            "p2nl": {"title": "1,000 images (2%), no labels", "subset": 1000, "labels": False,
                     "student": {"epochs": P2_EPOCHS, "eval_every": 50}},
        },
    },
    # Paper scale (GPU): ResNet-18 teachers as in the Nasty Teacher paper, their CIFAR-10 students.
    "paper": {
        "dataset": "cifar10", "teacher_model": "resnet18", "students": ["cnn", "resnet20", "resnet32", "resnet18"],
        "dfad_student": "resnet18",
        "train": {"batch_size": 128, "optimizer": "sgd", "nesterov": False, "weight_decay": 5e-4,
                  "schedule": "step", "lr_decay": 0.1},
        "teacher": {"epochs": 200, "lr": 0.1, "milestones": [100, 150]},
        "possessive": {"epochs": 200, "lr": 0.1, "milestones": [100, 150]},
        "student": {"epochs": 200, "lr": 0.1, "milestones": [100, 150]},
        "seeds": [0, 1, 2],
        "taus": [1.0, 4.0, 10.0, 20.0],
        "dfad": {"epochs": 500, "iters_per_epoch": 50, "k": 5, "batch_size": 256, "lr": 0.1,
                 "milestones": [100, 200]},
    },
}



def seeded(name, seed):
    """A student step's folder for a seed: seed 0 keeps the plain name, seed s the suffix _seed<s>."""
    return name if seed == 0 else f"{name}_seed{seed}"


def threat_model(preset, name):
    """The threat model `name` of a preset (its dict), or a UserError naming the preset's threat models."""
    threats = PRESETS[preset].get("threats", {})
    if name not in threats:
        known = ", ".join(threats) or "none"
        raise UserError(f"--threat: preset {preset} has no threat model '{name}'; choose one of: {known}")
    return threats[name]


def threat_record(preset, name):
    """What steps.json and the report say about a threat model: its name, title, images, labels and bar."""
    t = threat_model(preset, name)
    return {"name": name, "title": t["title"], "images": t["subset"] or None, "labels": t["labels"],
            "bar": "ls" if t["labels"] else "hardlabel"}


def defence_params(p, name, dataset):
    """The params of defence `name`'s teacher step on `dataset` in a preset (p: its dict): the preset's shared
    fine-tuning schedule (its "possessive" entry) for a trained defence, one epoch for a training-free one (it
    trains nothing), then the defence's own settings for the dataset (Defence.dataset_settings), then the
    preset's overrides for that defence (an entry named after it, e.g. "rml")."""
    defence = DEFENCES[name]
    params = dict(p["possessive"]) if defence.trained else {"epochs": 1}
    params.update(defence.dataset_settings(dataset))
    params.update(p.get(name, {}))
    return params


def plan(preset, dataset=None, seeds=(0,), defences=(), amp=None, threat=None):
    """The steps of a preset: a list of dicts {name, script, params, role}. Teachers are trained once (seed
    0); every student arm (scratch, label smoothing, each attack x teacher) and DFAD once per seed.
    defences: registered defences outside the battery to screen as well (battery_teachers): every attack
    against them with the first seed alone; a defence joins the battery (Defence.battery) for the full protocol.
    amp: the precision of every student arm and DFAD run (the config's amp: auto, off, bf16, fp16), e.g. off to
    measure a seed without a fast low precision; None keeps the preset's. Teachers keep the preset's either
    way: they are trained once and shared by every seed.
    threat: a threat model of the preset (METHOD.md section 10): every student arm holds its images (a subset
    drawn with the arm's seed) and labels or not, on its schedule; the label-free one has no scratch student (its
    bar is hard-label KD from the original, which is in the battery; label smoothing stays as the literature's
    bar); DFAD holds no images, so it is not planned again."""
    teachers = battery_teachers(defences)
    in_battery = set(battery_teachers())
    p = PRESETS[preset]
    dataset = dataset or p["dataset"]
    base = dict(p["train"], dataset=dataset, seed=0)
    steps = []

    def add(name, script, role, **params):
        steps.append({"name": name, "script": script, "role": role, "params": dict(base, **params)})

    arch = p["teacher_model"]
    add(f"teacher_{arch}", "train_scratch.py", {"kind": "teacher", "teacher": "original"},
        model=arch, **p["teacher"])
    teacher_ckpt = {"original": f"teacher_{arch}/{WEIGHTS_FILE}"}
    for name in teachers[1:]:
        add(f"{name}_{arch}", "train_possessive.py", {"kind": "teacher", "teacher": name}, model=arch, method=name,
            original=teacher_ckpt["original"], **defence_params(p, name, dataset))
        teacher_ckpt[name] = f"{name}_{arch}/{WEIGHTS_FILE}"
    dfad_teachers = ["original"] + [n for n in teachers[1:] if DEFENCES[n].dfad]
    steps += student_steps(preset, dataset, seeds, teacher_ckpt, amp=amp, threat=threat,
                           first_seed_only=[n for n in teachers if n not in in_battery],
                           dfad_teachers=dfad_teachers)
    return steps


def student_steps(preset, dataset, seeds, teacher_ckpt, amp=None, threat=None, first_seed_only=(), dfad_teachers=(),
                  students=None):
    """Every student arm of a preset for each seed: scratch and label smoothing, every attack of the battery
    against every teacher of `teacher_ckpt` ({teacher name: its weights, relative to the teachers' folder}),
    and DFAD against `dfad_teachers` (none under a threat model: DFAD holds no images). Teachers in
    `first_seed_only` (defences being screened) are attacked with the first seed alone. students: the student
    architectures (default: the preset's). plan() and judge.py build their student steps with it."""
    p = PRESETS[preset]
    t = threat_model(preset, threat) if threat else None
    base = dict(p["train"], dataset=dataset or p["dataset"], seed=0)
    steps = []

    def add(name, script, role, **params):
        steps.append({"name": name, "script": script, "role": role, "params": dict(base, **params)})

    script_of = {"student": "train_scratch.py", "kd": "train_kd.py", "dfad": "train_dfad.py"}
    for seed in seeds:
        def arm(name, role, **params):
            if amp is not None:
                params["amp"] = amp
            if t is not None:
                name += t.get("suffix", "")
                role = dict(role, threat=threat)
                if t["subset"]:
                    params.update(subset=t["subset"], subset_seed=seed)
                if not t["labels"] and role["kind"] == "kd":
                    params["labels"] = False
            add(seeded(name, seed), script_of[role["kind"]], dict(role, seed=seed), **params, seed=seed)

        student_cfg = dict(p["student"], **(t["student"] if t else {}))
        for student in students or p["students"]:
            if t is None or t["labels"]:
                arm(f"scratch_{student}", {"kind": "student", "arch": student, "source": "scratch"},
                    model=student, **student_cfg)
            arm(f"ls_{student}", {"kind": "student", "arch": student, "source": "ls"},
                model=student, label_smoothing=0.1, **student_cfg)
            for teacher in teacher_ckpt:
                if teacher in first_seed_only and seed != min(seeds):
                    continue  # a defence being screened is attacked with the first seed only
                for attack in battery_attacks():
                    sweep = {"tau_sweep": p["taus"]} if len(p["taus"]) > 1 else {"tau": p["taus"][0]}
                    arm(f"kd_{attack}_{teacher}_{student}",
                        {"kind": "kd", "arch": student, "teacher": teacher, "attack": attack},
                        model=student, teacher=teacher_ckpt[teacher], attack=attack, **sweep, **student_cfg,
                        **p.get("attacks", {}).get(attack, {}))
        for teacher in dfad_teachers if t is None else []:
            student = p["dfad_student"]
            arm(f"dfad_{teacher}_{student}", {"kind": "dfad", "arch": student, "teacher": teacher},
                model=student, teacher=teacher_ckpt[teacher], **p["dfad"])
    return steps


def _resolve_paths(step, teachers_root):
    """Checkpoint references inside a preset are relative to the folder of its teachers (the preset folder, or
    for a threat model the preset folder its teachers come from)."""
    params = dict(step["params"])
    for key in CHECKPOINT_KEYS:
        if key in params:
            params[key] = os.path.join(teachers_root, params[key])
    return params


def _same(recorded, params):
    """Same config, checkpoint paths aside: which teacher a run used is checked by its weights digest
    (step_state), so a preset folder that moved (a clone, another --exp_root) still matches."""
    return changed_result_key(recorded, params, keys=params, ignore=CHECKPOINT_KEYS) is None


def finished_record(folder, params):
    """What a finished run of this folder recorded: {config, inputs, weights_sha256}, or None.

    A tau sweep's record is its sweep.json (with the config.json beside it for sweeps written before
    sweep.json carried its config); a single run's is its metrics.json.
    """
    if params.get("tau_sweep"):
        sweep = read_json(os.path.join(folder, "sweep.json"))
        if not isinstance(sweep, dict):
            return None
        config = sweep.get("config") or read_json(os.path.join(folder, "config.json")) or {}
        return {"config": config, "inputs": sweep.get("inputs"), "weights_sha256": None}
    metrics = read_json(os.path.join(folder, "metrics.json"))
    if not isinstance(metrics, dict):
        return None
    return {"config": metrics.get("config", {}), "inputs": metrics.get("inputs"),
            "weights_sha256": metrics.get("weights_sha256")}


def _read_checkpoint(path):
    """A checkpoint file's content, or None when there is no readable one."""
    if not os.path.isfile(path):
        return None
    try:
        return load_checkpoint(path)
    except UserError:
        return None


def weights_digest(path):
    """The weights digest of a checkpoint file, or None when there is no readable one."""
    ckpt = _read_checkpoint(path)
    return None if ckpt is None else checkpoint_digest(ckpt)


def _input_mismatch(inputs, deps):
    """Why a run's recorded inputs do not match its teachers as they are now (None when they all match).

    deps: {key: (teacher step, its weights digest now, or None when that step is to be trained again)}.
    """
    for key, (dep, digest) in sorted(deps.items()):
        if digest is None:
            return f"its {key} ({dep}) is to be trained again"
        used = (inputs or {}).get(key, {}).get("weights_sha256")
        if used is None:
            return f"it has no record of its {key}'s weights (a run from before provenance was recorded)"
        if used != digest:
            return f"it was trained from {key} weights {used[:12]}, {dep} now has {digest[:12]}"
    return None


def step_state(folder, params, deps=None, weights_needed=False):
    """(state, reason) of a step folder for the params it should run with and the teachers it loads.

    'done': a finished run with this config, trained from these very teachers (and, when later steps load
    this step, with its weights file present and matching what its metrics.json recorded);
    'stale': a finished run with this config whose teacher has changed or is to be trained again;
    'resume': an unfinished run (last.pth) of this config and these teachers; 'new': anything else.
    Stale and new steps are trained from the start; reason says why a step is not done.
    """
    deps = deps or {}
    rec = finished_record(folder, params)
    reason = None
    if rec is not None and _same(rec["config"], params):
        reason = _input_mismatch(rec["inputs"], deps)
        if reason is not None:
            return "stale", reason
        if not weights_needed:
            return "done", None
        weights = os.path.join(folder, WEIGHTS_FILE)
        ckpt = _read_checkpoint(weights)
        digest = None if ckpt is None else checkpoint_digest(ckpt)
        if digest is not None and digest == rec["weights_sha256"]:
            problem = key_problem(folder, ckpt.get("defence") or {})
            if problem is None:
                return "done", None
            return "stale", f"{weights} is a keyed teacher and {problem}; it is made again with a new key"
        reason = (f"{weights} is missing" if digest is None else
                  f"{weights} ({digest[:12]}) is not the file its metrics.json recorded "
                  f"({(rec['weights_sha256'] or 'none')[:12]})")
    lasts = [os.path.join(folder, "last.pth")] + [os.path.join(folder, d, "last.pth") for d in _subdirs(folder)]
    lasts = [p for p in lasts if os.path.isfile(p)]
    config = read_json(os.path.join(folder, "config.json"))
    if lasts and isinstance(config, dict) and _same(config, params):
        for last in lasts:
            try:
                inputs = load_checkpoint(last).get("inputs")
            except UserError:
                continue
            why = _input_mismatch(inputs, deps)
            if why is not None:
                return "new", f"its unfinished run cannot resume: {why}"
        return "resume", reason
    return "new", reason


def _subdirs(folder):
    return [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))] if os.path.isdir(folder) else []


def describe(step, preset):
    """The _comment written at the top of a step's params.json."""
    role, p = step["role"], step["params"]
    if role["kind"] == "teacher" and role.get("teacher") in DEFENCES and not DEFENCES[role["teacher"]].trained:
        return (f"Step of reproduce.py --preset {preset}: the original {p['model']} answering through the "
                f"training-free {role['teacher']} defence (nothing is trained).")
    what = {"teacher": f"{role.get('teacher')} teacher {p['model']}",
            "student": f"{p['model']} student, {role.get('source')}",
            "kd": f"{role.get('attack')} KD of {p['model']} from the {role.get('teacher')} teacher",
            "dfad": f"DFAD of {p['model']} from the {role.get('teacher')} teacher"}[role["kind"]]
    seed = f", seed {p['seed']}" if role.get("seed") else ""
    return f"Step of reproduce.py --preset {preset}: {what}, {p['epochs']} epochs{seed}."


def write_params(folder, params, comment=None, script=None):
    """Write params.json unless it already holds these params (comments and data paths aside); _script
    names the script the folder belongs to."""
    path = os.path.join(folder, "params.json")
    if os.path.isfile(path):
        with open(path) as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError:
                old = None
        if isinstance(old, dict) and changed_result_key(old, params) is None:
            return
    os.makedirs(folder, exist_ok=True)
    extra = {k: v for k, v in (("_comment", comment), ("_script", script)) if v}
    atomic_write_json(path, dict(params, **extra))


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


def run_step(script, argv):
    """Run a script's main() in this process (one torch import for the whole chain); return its exit code."""
    module = importlib.import_module(script[:-3])
    try:
        return module.main(argv) or 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _dependency_keys(step):
    """{params key: name of the step whose weights it loads} for the step's 'original' / 'teacher' entries."""
    return {k: step["params"][k].split("/")[0] for k in CHECKPOINT_KEYS if k in step["params"]}


def dependencies(step):
    """Names of the steps whose checkpoints this step loads (its 'original' / 'teacher' entries)."""
    return set(_dependency_keys(step).values())


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


def job_env(slot, jobs, share=None):
    """Environment of the process in job slot `slot` of `jobs`: its share of the CPU cores, its own GPU.

    share: how many steps the cores are split between (default jobs); a step that starts while fewer steps
    can run (the original teacher, which every other step waits for) gets the cores of the idle slots too.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not os.environ.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (share or jobs)))
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        import torch
        gpus = torch.cuda.device_count()
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def job_names(job):
    """The steps a job trains: one, or every student of a battery."""
    return [s["name"] for s in job.get("steps", [job["step"]])]


def batteries(todo):
    """Merge the KD jobs that can share their teacher's forward (utils/battery.py: same teacher, seed and data
    keys, all new or all resuming, no tau sweep) into one `train_kd.py --battery` job each; the rest as they are."""
    from utils.battery import SHARED_KEYS
    out, groups = [], {}
    for job in todo:
        step = job["step"]
        if step["script"] != "train_kd.py" or step["params"].get("tau_sweep"):
            out.append(job)
            continue
        key = (job["verb"],) + tuple(json.dumps(step["params"].get(k), sort_keys=True) for k in SHARED_KEYS)
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(job)
    merged = []
    for item in out:
        if isinstance(item, dict):
            merged.append(item)
        elif len(item) == 1:
            merged.append(item[0])
        else:
            first = item[0]
            folders = [j["folder"] for j in item]
            argv = ["--battery", ",".join(folders)] + first["argv"][2:]  # first argv: --save_path FOLDER ...
            heads = ", ".join(j["head"].split("]")[0] + "]" for j in item)
            merged.append(dict(first, steps=[j["step"] for j in item], argv=argv, folders=folders,
                               head=f"{heads} train_kd.py battery of {len(item)} ({', '.join(folders)})"))
    return merged


def run_parallel(todo, jobs, t0):
    """Run the steps in `todo` with up to `jobs` processes at once, each step once its teachers are done.

    A failed step stops new steps from starting; the running ones finish (their work is kept) and the
    error names the failed steps and their logs. SIGTERM/SIGINT are passed on to the running steps,
    which save a checkpoint and stop, so the same command resumes them.
    """
    pending = list(todo)
    pending_names = {n for j in todo for n in job_names(j)}
    running = {}  # slot -> (job, Popen, log file, start time)
    failed = []
    stopping = []

    def forward(signum, frame):
        stopping.append(signum)
        for _, proc, _, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    restore = catch_stop_signals(forward)
    try:
        while pending or running:
            for slot in [s for s in range(jobs) if s not in running]:
                if failed or stopping:
                    break
                ready = [j for j in pending if not dependencies(j["step"]) & pending_names]
                if not ready:
                    break
                job = ready[0]
                pending.remove(job)
                env = job_env(slot, jobs, min(jobs, len(running) + len(ready)))
                log = open(os.path.join(job["folder"], "run.log"), "a")
                for other in job.get("folders", [])[1:]:  # a battery's output is in its first student's folder
                    with open(os.path.join(other, "run.log"), "a") as f:
                        f.write(f"trained in a battery with {', '.join(job['folders'])}; its output: {log.name}\n")
                proc = subprocess.Popen([sys.executable, job["step"]["script"]] + job["argv"],
                                        stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=os.path.dirname(os.path.abspath(__file__)))
                running[slot] = (job, proc, log, time.time())
                threads = env.get("OMP_NUM_THREADS", "?")
                print(f"{job['head']}: {job['verb']} in slot {slot}, {threads} thread(s) "
                      f"({(time.time() - t0) / 60:.1f} min so far; log in {log.name})", flush=True)
            if not running:
                break
            time.sleep(0.5)
            for slot, (job, proc, log, start) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[slot]
                name = " + ".join(job_names(job))
                if code == 0:
                    pending_names.difference_update(job_names(job))
                    print(f"{job['head']}: finished in {(time.time() - start) / 60:.1f} min", flush=True)
                else:
                    failed.append((name, code, log.name))
                    print(f"{job['head']}: FAILED (exit {code}); last lines of {log.name}:\n{_tail(log.name)}",
                          flush=True)
    finally:
        restore()
    if stopping:
        raise UserError("stopped by a signal; re-run the same command: finished steps are skipped and "
                        "interrupted ones resume")
    if failed:
        names = ", ".join(f"{n} (exit {c}, see {path})" for n, c, path in failed)
        raise UserError(f"step(s) failed: {names}; fix the cause and re-run the same command: finished steps "
                        f"are skipped and interrupted ones resume")
    if pending:
        raise UserError("steps left that wait on a teacher that never finished: "
                        + ", ".join(n for j in pending for n in job_names(j)))


def _tail(path, lines=5):
    """The last non-empty lines of a log (progress bars' carriage returns count as line ends)."""
    with open(path, errors="replace") as f:
        text = f.read().replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def run_plan(steps, selected, exp_root, teachers_root, manifest, data_root, device="auto", jobs=1, dry_run=False,
             battery=True):
    """Bring the `selected` steps of a plan up to date: a finished step is skipped, an interrupted one resumes,
    a stale or new one is trained from the start. Students go to exp_root, teachers to teachers_root;
    manifest (steps.json without its steps: preset, threat model, where the teachers are) is written there
    with every step of the plan, so the report reads it. dry_run: print each step's state, change nothing.
    Returns the jobs that ran (a battery counts once)."""
    t0 = time.time()
    if not dry_run:  # a dry run changes nothing, not even the plan the report reads
        os.makedirs(exp_root, exist_ok=True)
        from utils.lock import acquire
        acquire(exp_root, "experiment root")  # its steps lock their own folders, below it
        manifest = dict(manifest, steps=[{k: s[k] for k in ("name", "script", "role")} for s in steps])
        atomic_write_json(os.path.join(exp_root, "steps.json"), manifest)
    todo = []
    counts = {}
    loaded = {d for s in steps for d in dependencies(s)}  # steps whose weights later steps load
    digests = {}  # teacher step -> digest of the weights its dependents will load (None: trained in this run)
    for step in steps:
        name = step["name"]
        folder = os.path.join(teachers_root if step["role"]["kind"] == "teacher" else exp_root, name)
        params = _resolve_paths(step, teachers_root)
        deps = {key: (dep, digests.get(dep)) for key, dep in _dependency_keys(step).items()}
        state, reason = step_state(folder, params, deps, weights_needed=name in loaded)
        chosen = step in selected
        if name in loaded:
            if state == "done":
                digests[name] = finished_record(folder, params)["weights_sha256"]
            elif not chosen:  # not run now: its dependents load whatever file is there
                digests[name] = weights_digest(os.path.join(folder, WEIGHTS_FILE))
            else:
                digests[name] = None
        if not chosen:
            continue
        counts[state] = counts.get(state, 0) + 1
        head = f"[{selected.index(step) + 1}/{len(selected)}] {step['script']} {folder}"
        why = f" ({reason})" if reason else ""
        if dry_run:
            print(f"{head}: {state}{why}")
            continue
        if state == "done":
            print(f"{head}: done, skipped", flush=True)
            continue
        if state == "stale":
            print(f"{head}: stale{why}; training it again", flush=True)
        elif reason:
            print(f"{head}: {state}{why}", flush=True)
        write_params(folder, params, step.get("comment") or describe(step, manifest["preset"]), step["script"])
        argv = ["--save_path", folder, "--data_root", data_root, "--device", device]
        # a stale or new step is trained from the start: a finished run there (older config or teachers) is
        # replaced knowingly, so the scripts' refusal of a finished folder does not stop the chain
        argv.append("--resume" if state == "resume" else "--overwrite")
        todo.append({"step": step, "head": head, "argv": argv, "folder": folder,
                     "verb": "resuming" if state == "resume" else "running"})
    print(f"{len(selected)} steps: " + ", ".join(f"{counts[k]} {k}" for k in ("done", "stale", "resume", "new")
                                                 if counts.get(k)), flush=True)
    if battery:
        todo = batteries(todo)
    if jobs == 1:
        for job in todo:
            print(f"{job['head']}: {job['verb']} ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
            code = run_step(job["step"]["script"], job["argv"])
            if code != 0:
                raise UserError(f"step {' + '.join(job_names(job))} failed (exit {code}); fix the cause and re-run the same "
                                f"command: finished steps are skipped and this one resumes")
    elif todo:
        run_parallel(todo, jobs, t0)
    return todo


@cli_main
def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    parser.add_argument("--dataset", choices=sorted(DATASET_TAU), default=None,
                        help="override the preset's dataset (cifar10, cifar100, tinyimagenet)")
    parser.add_argument("--data_root", default="./data")
    parser.add_argument("--download", nargs="?", const="true", default="false", type=_flag, metavar="true/false",
                        help="fetch the dataset into --data_root first if it is missing (once, before any step); "
                             "given alone it means true, as in the training scripts")
    parser.add_argument("--exp_root", default=None, help="default: exps/<preset> (exps/<preset>_<dataset> if --dataset)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", default=None, help="run only the steps whose name contains this text")
    parser.add_argument("--dry_run", action="store_true",
                        help="list the steps and their state, run nothing (needs no data)")
    parser.add_argument("--compare", metavar="REF", default=None,
                        help="at the end, write EXP_ROOT/comparison.md: every row beside the same row of REF (e.g. "
                             "the committed exps/mini, when --exp_root puts this run elsewhere)")
    parser.add_argument("--seeds", default=None,
                        help="student seeds, e.g. 0,1,2: every student arm and DFAD is trained once per seed (teachers "
                             "once); seeds already in EXP_ROOT/steps.json are kept in the report (default: the "
                             "preset's, 0,1,2 for mini and paper and 0 for tiny, plus those)")
    parser.add_argument("--defences", default=None,
                        help="also screen these registered defences outside the default battery, e.g. keyed,keyedflat: every "
                             "attack against them, first seed only; kept in EXP_ROOT/steps.json, so later runs and the "
                             "report keep them too")
    parser.add_argument("--amp", choices=CHOICES["amp"], default=None,
                        help="precision of the student steps (every arm and DFAD, every seed): off trains them in fp32, "
                             "e.g. to time a seed on a machine without fast bf16 (default: the preset's, auto); "
                             "teachers keep the preset's")
    parser.add_argument("--threat", default=None, metavar="NAME",
                        help="train the student arms of this threat model of the preset (what the thief holds: "
                             "mini has full, p10, p10nl, p2, p2nl; METHOD.md section 10) into exps/<preset>_<NAME>, "
                             "against the teachers of exps/<preset> (trained there first if missing)")
    parser.add_argument("--teachers_from", default=None, metavar="DIR",
                        help="with --threat: the preset folder whose teachers are attacked (default exps/<preset>)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="steps run at once, each in its own process (default 1: one after another, in this process)")
    parser.add_argument("--no_battery", action="store_true",
                        help="train every KD student in its own process; by default the students of one teacher and "
                             "seed are trained together, one teacher forward per batch for all (train_kd.py --battery)")
    parser.add_argument("--cost", metavar="FILE", default=None,
                        help="with --dry_run: projected device-hours per step and in all, from the epoch times in FILE "
                             "(the epoch_times.json of bench/cuda_check.py; see utils/cost.py)")
    args = parser.parse_args(argv)
    from utils.cost import load_epoch_times, projection_text
    if args.cost and not args.dry_run:
        raise UserError("--cost projects the device time of the steps and runs nothing: add --dry_run")
    epoch_times = load_epoch_times(args.cost) if args.cost else None
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    if args.compare and not os.path.isfile(os.path.join(args.compare, "steps.json")):
        raise UserError(f"--compare {args.compare}: no steps.json there; pass a preset folder written by reproduce.py, "
                        f"e.g. exps/mini")
    preset_root = os.path.join("exps", args.preset if not args.dataset else f"{args.preset}_{args.dataset}")
    threat = threat_model(args.preset, args.threat) if args.threat else None
    if threat is None:
        exp_root = args.exp_root or preset_root
        teachers_root = exp_root
    else:
        exp_root = args.exp_root or os.path.join("exps", threat.get("root", f"{args.preset}_{args.threat}"))
        teachers_root = args.teachers_from or preset_root
    if args.teachers_from and threat is None:
        raise UserError("--teachers_from goes with --threat (a threat model's students against another folder's teachers)")
    if args.download and not args.dry_run:
        fetch_dataset(args.dataset or PRESETS[args.preset]["dataset"], args.data_root)
    if not args.dry_run and not os.path.isdir(args.data_root):
        raise UserError(f"data_root '{args.data_root}' does not exist; pass --data_root pointing at your dataset copy")
    seeds = parse_seeds(args.seeds, PRESETS[args.preset].get("seeds", (0,)))
    old = read_json(os.path.join(exp_root, "steps.json"))
    old_steps = old["steps"] if isinstance(old, dict) and "steps" in old else []
    known = sorted({s["role"].get("seed", 0) for s in old_steps})
    screened = _parse_defences(args.defences)
    screened += [s["role"]["teacher"] for s in old_steps  # defences screened before stay in the plan
                 if s["role"].get("kind") == "teacher" and s["role"]["teacher"] in DEFENCES
                 and s["role"]["teacher"] not in battery_teachers(screened)]
    steps = plan(args.preset, args.dataset, sorted(set(seeds) | set(known)), screened, args.amp, args.threat)
    run_seeds = set(seeds) if args.seeds is not None else set(seeds) | set(known)
    selected = [s for s in steps if (not args.only or args.only in s["name"])
                and (s["role"]["kind"] == "teacher" or s["role"].get("seed", 0) in run_seeds)]
    if not selected:
        names = [s["name"] for s in steps]
        hint = close_match(args.only, names) if args.only else ""
        raise UserError(f"--only {args.only!r} matches none of the {len(steps)} steps of preset {args.preset}{hint}; "
                        f"give part of a step name (python reproduce.py --preset {args.preset} --dry_run lists them)")
    manifest = {"preset": args.preset}
    if threat is not None:
        manifest.update(threat=threat_record(args.preset, args.threat),
                        teachers_from=os.path.relpath(teachers_root, exp_root))
    t0 = time.time()
    todo = run_plan(steps, selected, exp_root, teachers_root, manifest, args.data_root, device=args.device,
                    jobs=args.jobs, dry_run=args.dry_run, battery=not args.no_battery)
    if args.dry_run:
        if epoch_times is not None:
            print(projection_text(selected, epoch_times, args.cost), end="")
        return 0
    total = time.time() - t0
    import report
    if not todo:  # nothing ran: the wall time of the last run that trained something still describes the folder
        extra = None
    elif not args.only:
        extra = {"reproduce_wall_time_s": round(total, 1), "jobs": args.jobs}
    else:  # a partial run: the last full run's wall time no longer describes the folder (kept if nothing ran)
        extra = {"reproduce_wall_time_s": None, "jobs": None} if todo else None
    res = report.build(exp_root, extra=extra)
    if args.compare:
        text = report.comparison(res, report.collect(args.compare), exp_root, args.compare)
        atomic_write_text(os.path.join(exp_root, "comparison.md"), text)
        print(text, end="")
    print(f"all {len(selected)} steps done in {total / 60:.1f} min; results in {os.path.join(exp_root, 'results.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
