"""The plan of a preset: every step (teachers, then every student arm per seed) as {name, script, params, role},
and what each step loads from the others."""
import os

from utils.attacks import ATTACKS
from utils.checkpoint import WEIGHTS_FILE
from utils.defences import DEFENCES

from .presets import CHECKPOINT_KEYS, PRESETS, defence_params, grid_attacks, grid_teachers, seeded, threat_model

def shares_with_twin(role):
    """Whether a label-free threat model's arm (its role) is its labelled twin's run (presets: twin): label
    smoothing (a student role, on the true labels: the labelled thief's bar) and the attacks that read no label
    (Attack.reads_labels: hard-label KD)."""
    attack = ATTACKS.get(role.get("attack")) if role["kind"] == "kd" else None
    return role.get("source") == "ls" or (attack is not None and not attack.reads_labels)


def plan(preset, dataset=None, seeds=(0,), defences=(), amp=None, threat=None, twin_folder=None, siblings=False):
    """The steps of a preset: a list of dicts {name, script, params, role}. Teachers are trained once (seed
    0); every student arm (scratch, label smoothing, each attack x teacher) and DFAD once per seed.
    defences: registered defences outside the battery to screen as well (grid_teachers): every attack
    against them with the first seed alone; a defence joins the battery (Defence.battery) for the full protocol.
    amp: the precision of every student arm and DFAD run (the config's amp: auto, off, bf16, fp16), e.g. off to
    measure a seed without a fast low precision; None keeps the preset's. Teachers keep the preset's either
    way: they are trained once and shared by every seed.
    threat: a threat model of the preset (METHOD.md section 10): every student arm holds its images (a subset
    drawn with the arm's seed) and labels or not, on its schedule; the label-free one has no scratch student (its
    bar is hard-label KD from the original, which is in the battery; label smoothing stays as the literature's
    bar); DFAD holds no images, so it is not planned again.
    twin_folder: for a label-free threat model with a labelled twin (presets: twin), the twin's folder as a sibling
    of this one's (e.g. threat_p2): its label-smoothing and hard-label arms are named there ("../threat_p2/ls_cnn"),
    the twin's own runs, trained once; None trains them in this threat model's folder.
    siblings: the threat model's folder is its own under exps/ (reproduce.py without --exp_root), beside the other
    experiments' folders: a run another experiment trained first (presets: trained_in) is named by its path
    there ("../mini_curve/kd_vanilla_original_cnn_e24"); False trains it in this folder."""
    p = PRESETS[preset]
    teachers = grid_teachers(p, threat, defences)
    in_battery = set(grid_teachers(p, threat))
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
                           dfad_teachers=dfad_teachers, twin_folder=twin_folder, siblings=siblings)
    return steps


def student_steps(preset, dataset, seeds, teacher_ckpt, amp=None, threat=None, first_seed_only=(), dfad_teachers=(),
                  students=None, twin_folder=None, siblings=False):
    """Every student arm of a preset for each seed: scratch and label smoothing, every attack of the battery
    against every teacher of `teacher_ckpt` ({teacher name: its weights, relative to the teachers' folder}),
    and DFAD against `dfad_teachers` (none under a threat model: DFAD holds no images). Teachers in
    `first_seed_only` (defences being screened) are attacked with the first seed alone. students: the student
    architectures (default: the preset's). twin_folder, siblings: as for plan(). plan() and judge.py build their student
    steps with it."""
    p = PRESETS[preset]
    t = threat_model(preset, threat) if threat else None
    twin = threat_model(preset, t["twin"]) if t is not None and t.get("twin") and twin_folder else None
    if twin is not None and (twin["subset"], twin["student"], twin["labels"], t["labels"]) != (
            t["subset"], t["student"], True, False):
        raise ValueError(f"preset {preset}: threat model {threat} is label-free and its twin {t['twin']} must be the "
                         "same images and schedule with labels")
    base = dict(p["train"], dataset=dataset or p["dataset"], seed=0)
    steps = []

    def add(name, script, role, **params):
        steps.append({"name": name, "script": script, "role": role, "params": dict(base, **params)})

    script_of = {"student": "train_scratch.py", "kd": "train_kd.py", "dfad": "train_dfad.py"}
    for seed in seeds:
        def arm(name, role, **params):
            tm = twin if twin is not None and shares_with_twin(role) else t  # whose step this is
            if amp is not None:
                params["amp"] = amp
            if tm is not None:
                name += tm.get("suffix", "")
                role = dict(role, threat=threat)
                if tm["subset"]:
                    params.update(subset=tm["subset"], subset_seed=seed)
                if not tm["labels"] and role["kind"] == "kd":
                    params["labels"] = False
            name = seeded(name, seed)
            if tm is not t:
                name = f"../{twin_folder}/{name}"
            elif siblings and name in (t or {}).get("trained_in", {}):
                name = f"../{t['trained_in'][name]}/{name}"
            add(name, script_of[role["kind"]], dict(role, seed=seed), **params, seed=seed)

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
                for attack in grid_attacks(p, threat):
                    sweep = {"tau_sweep": p["taus"]} if len(p["taus"]) > 1 else {"tau": p["taus"][0]}
                    arm(f"kd_{attack}_{teacher}_{student}",
                        {"kind": "kd", "arch": student, "teacher": teacher, "attack": attack},
                        model=student, teacher=teacher_ckpt[teacher], attack=attack, **sweep, **student_cfg,
                        **p.get("attacks", {}).get(attack, {}))
                if t is not None and t.get("val_split") and p.get("tuned_taus"):
                    # the self-tuning thief: vanilla KD at the tau it picks on its own held-out images
                    tuned = dict(model=student, teacher=teacher_ckpt[teacher], attack="vanilla",
                                 tau_sweep=p["tuned_taus"], val_split=t["val_split"], **student_cfg)
                    role = {"kind": "kd", "arch": student, "teacher": teacher}
                    arm(f"kd_tuned_{teacher}_{student}", dict(role, attack="tuned"), **tuned)
                    # and the same sweep picked by cross-entropy there: the tuned arm's runs, nothing trained again
                    arm(f"kd_tunednll_{teacher}_{student}", dict(role, attack="tuned_nll"), **tuned,
                        select_by="val_nll", runs_from=steps[-1]["name"])
        for teacher in dfad_teachers if t is None else []:
            student = p["dfad_student"]
            arm(f"dfad_{teacher}_{student}", {"kind": "dfad", "arch": student, "teacher": teacher},
                model=student, teacher=teacher_ckpt[teacher], **p["dfad"])
    return steps


def resolve_paths(step, teachers_root, exp_root=None):
    """Checkpoint references inside a preset are relative to the folder of its teachers (the preset folder, or
    for a threat model the preset folder its teachers come from); a sweep's runs_from names another step of the
    same experiment folder (exp_root)."""
    params = dict(step["params"])
    for key in CHECKPOINT_KEYS:
        if key in params:
            params[key] = os.path.join(teachers_root, params[key])
    if params.get("runs_from"):
        params["runs_from"] = os.path.normpath(os.path.join(exp_root, params["runs_from"]))
    return params


def dependency_keys(step):
    """{params key: name of the step whose weights it loads} for the step's 'original' / 'teacher' entries."""
    return {k: step["params"][k].split("/")[0] for k in CHECKPOINT_KEYS if k in step["params"]}


def dependencies(step):
    """Names of the steps whose checkpoints this step loads (its 'original' / 'teacher' entries)."""
    return set(dependency_keys(step).values())


def waits_on(step):
    """Names of the steps that must finish before this one runs: those whose checkpoints it loads, and the sweep
    whose runs it picks among (runs_from)."""
    return dependencies(step) | ({step["params"]["runs_from"]} if step["params"].get("runs_from") else set())


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
