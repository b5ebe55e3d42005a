"""The presets of the reproduction (the scale of every step, the seeds, the thief's threat models) and the
battery they run: which teachers and attacks, how a step's folder is named for a seed."""
from utils.attacks import ATTACKS
from utils.defences import DEFENCES
from utils.errors import UserError

# Params that name another step's checkpoint ("<step>/weights.pth", relative to the preset folder): the
# weights-only file a finished run leaves, which is also what a released teacher ships.
CHECKPOINT_KEYS = ("original", "teacher")


# Student epochs of the threat models, chosen by the doubling rule on their curves (exps/threat_curve,
# docs/RESULTS.md): label smoothing is flat at 120 epochs on 5,000 images and at 150 on 1,000; vanilla KD from the
# original, the slower arm, at 240 (+0.70 to 480) and at 1200 (+0.33 to 2400).
P10_EPOCHS = 240
P2_EPOCHS = 1200

# The threat models' student arms run in fp32 on every machine (the config's amp: off). Their grid is landed piece
# by piece on whatever machine a session has (a 2-core AVX2 CPU, one with AVX-512 BF16, a GPU), and a verdict
# pairs the bar with each attack seed by seed: both must be in one precision. reproduce.py --amp still overrides it.
THREAT_AMP = "off"


def battery_teachers(extra=()):
    """The teachers every attack is run against: the original, then each defence of the registry's battery,
    then the defences outside it asked for (`extra`: reproduce.py --defences, e.g. variants being screened)."""
    names = ["original"] + [name for name, d in DEFENCES.items() if d.battery]
    return names + [name for name in extra if name not in names]


def battery_attacks():
    """The attacks of the registry that the battery runs against every teacher."""
    return [name for name, a in ATTACKS.items() if a.battery]


def grid_teachers(p, threat=None, extra=()):
    """The teachers a preset's plan attacks: the registry's battery, or for a preset's full-data grid the teachers
    its committed runs hold ("grid_teachers") when it names them; then the defences screened (`extra`)."""
    names = list(p["grid_teachers"]) if threat is None and "grid_teachers" in p else battery_teachers()
    return names + [name for name in extra if name not in names]


def grid_attacks(p, threat=None):
    """The attacks a preset's plan runs against every teacher: the registry's battery, or for a preset's
    full-data grid the attacks its committed runs hold ("grid_attacks") when it names them."""
    return list(p["grid_attacks"]) if threat is None and "grid_attacks" in p else battery_attacks()


PRESETS = {
    # Seconds per step on generated data: the test suite runs the whole chain with it.
    "tiny": {
        "dataset": "cifar10", "teacher_model": "cnn", "students": ["cnn_small"], "dfad_student": "cnn_small",
        "train": {"batch_size": 20, "eval_batch_size": 50, "amp": "off", "log_every": 5},
        "teacher": {"epochs": 2, "lr": 0.05},
        "possessive": {"epochs": 1, "lr": 0.02, "init_from_original": True},
        "student": {"epochs": 1, "lr": 0.05},
        "taus": [4.0],
        "tuned_taus": [1.0, 4.0],
        "dfad": {"epochs": 1, "iters_per_epoch": 2, "k": 2, "batch_size": 16, "lr": 0.05},
        "threats": {
            "s50": {"title": "50 labelled images", "subset": 50, "labels": True, "val_split": 10,
                    "student": {"epochs": 2}},
            "s50nl": {"title": "50 images, no labels", "subset": 50, "labels": False, "val_split": 10,
                      "twin": "s50", "student": {"epochs": 2}},
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
        # The attacks of the full-data grid as its committed runs hold them (exps/mini): an attack that joins the
        # registry's battery later (the Skeptical student) is in every threat model's battery at once, and here
        # once its runs against the released teachers land.
        "grid_attacks": ["vanilla", "rereverse", "dkd", "tckd", "hardlabel", "markov"],
        # Its teachers likewise: RML + Nasty joined the battery after the full-data grid ran.
        "grid_teachers": ["original", "rml", "nasty", "stingy", "posthoc"],
        # The self-tuning thief of every threat model: vanilla KD swept over these temperatures, picked on the
        # threat model's val_split of the thief's own images (METHOD.md section 10).
        "tuned_taus": [1.0, 4.0, 10.0, 20.0],
        # DFAD: 8 epochs of 50 generator iterations at a constant lr (milestone at the end), the budget where
        # the student of the original passes 40% (exps/mini_dfad_curve, README); about 12 min a run, one thread
        "dfad": {"epochs": 8, "iters_per_epoch": 50, "k": 5, "batch_size": 128, "lr": 0.1,
                 "schedule": "step", "milestones": [8]},
        # The thief's threat models (METHOD.md section 10): reproduce.py --threat NAME trains the student arms
        # into exps/mini_<NAME>, against the teachers of exps/mini; the full-data one into exps/mini_long, p10 into
        # exps/threat_skeptical, p2 into exps/threat_p2 and p2nl into exps/threat_p2nl, where their first rows
        # landed (schedules of the same steps), so the grid goes on from them instead of training them again.
        # Each schedule is the one chosen by the doubling rule on its own curve (exps/threat_curve).
        "threats": {
            # val_split: the images (a tenth of the thief's) the self-tuning thief holds out to pick its tau.
            # twin: a label-free threat model's labelled twin (the same images and schedule). Its arms that never
            # read a label are the twin's runs: label smoothing (the labelled thief's bar, on the true labels) and
            # hard-label KD (the teacher's argmax alone), the same weights bit for bit (tests/test_threat.py), so
            # the grid trains them once, in the twin's folder (plan: twin_folder).
            # trained_in: runs of the threat model another experiment trained first, in its folder under exps/
            # ({run: folder}): the full-data curve's 24-epoch point is the long schedule's seed-0 vanilla KD from
            # the original, so the grid names it there (plan: siblings) instead of training it again.
            "full": {"title": "all 50,000 labelled images", "subset": 0, "labels": True, "root": "mini_long",
                     "suffix": "_e24", "val_split": 5000, "student": {"epochs": 24},
                     "trained_in": {"kd_vanilla_original_cnn_e24": "mini_curve"}},
            "p10": {"title": "5,000 labelled images (10%)", "subset": 5000, "labels": True, "val_split": 500,
                    "root": "threat_skeptical",
                    "student": {"epochs": P10_EPOCHS, "eval_every": 10, "amp": THREAT_AMP}},
            "p10nl": {"title": "5,000 images (10%), no labels", "subset": 5000, "labels": False, "val_split": 500,
                      "twin": "p10", "student": {"epochs": P10_EPOCHS, "eval_every": 10, "amp": THREAT_AMP}},
            "p2": {"title": "1,000 labelled images (2%)", "subset": 1000, "labels": True, "val_split": 100,
                   "root": "threat_p2",
                   "student": {"epochs": P2_EPOCHS, "eval_every": 50, "amp": THREAT_AMP}},
            "p2nl": {"title": "1,000 images (2%), no labels", "subset": 1000, "labels": False, "val_split": 100,
                     "root": "threat_p2nl", "twin": "p2",
                     "student": {"epochs": P2_EPOCHS, "eval_every": 50, "amp": THREAT_AMP}},
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


def threat_folder(preset, name):
    """The folder under exps/ that a threat model's grid trains into: its "root", or <preset>_<name>."""
    return threat_model(preset, name).get("root", f"{preset}_{name}")


def twin_folder(preset, name):
    """The folder under exps/ of a threat model's labelled twin (presets: twin), or None when it has none."""
    twin = threat_model(preset, name).get("twin")
    return threat_folder(preset, twin) if twin else None


def threat_record(preset, name):
    """What steps.json and the report say about a threat model: its name, title, images, labels and bar."""
    t = threat_model(preset, name)
    return {"name": name, "title": t["title"], "images": t["subset"] or None, "labels": t["labels"],
            "bar": "ls" if t["labels"] else "hardlabel"}
