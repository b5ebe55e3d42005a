"""The registry of defences: every way a model owner protects the original model, one entry each.

A *trained* defence (RML, Nasty) fine-tunes or trains a teacher against the frozen original with its own
loss (`loss`). A *training-free* defence (Stingy, post-hoc reversal) keeps the original's weights and
changes its answers at query time (`transform`): its published teacher is the original's weights plus
the defence's name and settings, and `build_from_checkpoint` rebuilds it wrapped (DefendedModel), so a thief
queries the defended outputs whichever script loads it.

Each entry declares its config keys (train_possessive.py's keys are the union), checks them, names itself
for the report, and says what settings reproduce.py's battery gives it (`battery_params`). Adding a
defence is one class here plus its test; train_possessive.py, the battery, report.py's table and figures
pick it up from DEFENCES.
"""
import torch

from . import registry
from .errors import UserError
from .losses import REVERSE_SCOPES, nasty_loss, reverse_logits, rml_loss

DEFENCES = {}

# Datasets' usual temperature (RML, Nasty) and Nasty's omega (METHOD.md sections 2-3).
DATASET_TAU = {"cifar10": 4.0, "cifar100": 20.0, "tinyimagenet": 20.0}
DATASET_OMEGA = {"cifar10": 0.04, "cifar100": 0.005, "tinyimagenet": 0.01}


def register(cls):
    """Class decorator: add a defence to DEFENCES under cls.name (a name may be registered once)."""
    return registry.add(DEFENCES, cls, "defence", reserved=("original",))


def defence_keys():
    """The config keys of every registered defence with their defaults (one default per key)."""
    return registry.merged_keys(DEFENCES, "defence")


class Defence:
    name = ""
    label = ""          # as the report names it
    keys = {}           # config keys read by this defence, with defaults
    trained = True      # False: a query-time transform of the original's logits
    battery = True      # attacked by every attack in reproduce.py's battery
    dfad = False        # also attacked without data (DFAD) in the battery

    @classmethod
    def check(cls, cfg, source):
        """Raise UserError for a bad value of this defence's keys."""

    @classmethod
    def battery_params(cls, preset, dataset):
        """The step's params in reproduce.py's battery: preset is the preset dict (its 'possessive' entry
        holds the shared fine-tuning schedule, an entry named after the defence its own overrides)."""
        params = dict(preset["possessive"]) if cls.trained else {"epochs": 1}
        params.update(preset.get(cls.name, {}))
        return params

    # trained defences
    def __init__(self, cfg):
        self.cfg = cfg

    def loss(self, logits, original_logits, labels, progress):
        raise NotImplementedError

    # training-free defences
    @staticmethod
    def transform(logits, settings):
        """The defended answer to a batch of the original's logits; settings: the defence's keys."""
        raise NotImplementedError

    version = 1  # of a training-free transform: recorded in the teacher file, so a changed transform is a new teacher

    @classmethod
    def settings(cls, cfg):
        """What a training-free teacher file records: the defence's own keys, and its transform's version when
        above 1 (so its weights digest changes with it and reproduce.py re-runs what was made with the old one)."""
        settings = {key: cfg[key] for key in cls.keys}
        if cls.version > 1:
            settings["version"] = cls.version
        return settings


def _non_negative(cfg, keys, source):
    for key in keys:
        if cfg[key] < 0:
            raise UserError(f"{source}: '{key}' must be >= 0, got {cfg[key]}")


@register
class RML(Defence):
    """Reversed Maximization Learning (METHOD.md section 2): CE + binary term + reversed non-target term
    (- gamma x the Nasty-style maximisation over non-targets); beta ramps up over beta_warmup epochs."""
    name, label = "rml", "possessive (RML)"
    keys = {"tau": 4.0, "alpha": 1.0, "beta": 1.0, "gamma": 0.0, "beta_warmup": 0.0, "reverse_scope": "non_target"}
    dfad = True

    @classmethod
    def check(cls, cfg, source):
        if cfg["reverse_scope"] not in REVERSE_SCOPES:
            raise UserError(f"'reverse_scope' must be one of {', '.join(REVERSE_SCOPES)}, got '{cfg['reverse_scope']}'")
        _non_negative(cfg, ("alpha", "beta", "gamma", "beta_warmup"), source)

    @classmethod
    def battery_params(cls, preset, dataset):
        params = dict(preset["possessive"], tau=DATASET_TAU[dataset], alpha=1.0, beta=1.0, gamma=0.0)
        params.update(preset.get(cls.name, {}))
        return params

    def loss(self, logits, original_logits, labels, progress):
        cfg = self.cfg
        beta = cfg["beta"]
        if cfg["beta_warmup"] > 0:
            beta *= min(1.0, progress / cfg["beta_warmup"])
        return rml_loss(logits, original_logits, labels, cfg["tau"], cfg["alpha"], beta, cfg["gamma"],
                        cfg["reverse_scope"])


@register
class Nasty(Defence):
    """Nasty Teacher (METHOD.md section 3): CE - omega tau^2 KL(p_n^tau || p_o^tau)."""
    name, label = "nasty", "Nasty"
    keys = {"tau": 4.0, "omega": 0.04}

    @classmethod
    def check(cls, cfg, source):
        _non_negative(cfg, ("omega",), source)

    @classmethod
    def battery_params(cls, preset, dataset):
        params = dict(preset["possessive"], tau=DATASET_TAU[dataset], omega=DATASET_OMEGA[dataset])
        params.update(preset.get(cls.name, {}))
        return params

    def loss(self, logits, original_logits, labels, progress):
        return nasty_loss(logits, original_logits, labels, self.cfg["tau"], self.cfg["omega"])


# A logit this far below the row's maximum has softmax probability exactly 0 in float32 at every
# temperature up to ~90 (exp(-10000 / 90) underflows): it stands for Stingy's -inf without turning a
# KL's 0 * log 0 into NaN.
MASKED_LOGIT_GAP = 1.0e4


@register
class Stingy(Defence):
    """Stingy teacher (Ma et al.; METHOD.md section 7): the original's top-k logits by value are kept, the
    others masked (k = int(stingy_ratio x C), at least 1; the label is not used). Training-free."""
    name, label = "stingy", "Stingy (top-k)"
    keys = {"stingy_ratio": 0.2}
    trained = False

    @classmethod
    def check(cls, cfg, source):
        if not 0 < cfg["stingy_ratio"] <= 1:
            raise UserError(f"{source}: 'stingy_ratio' must be in (0, 1], got {cfg['stingy_ratio']}")

    @staticmethod
    def transform(logits, settings):
        k = max(1, int(settings["stingy_ratio"] * logits.shape[1]))
        top = logits.topk(k, dim=1).indices
        floor = logits.max(dim=1, keepdim=True).values - MASKED_LOGIT_GAP
        return floor.expand_as(logits).scatter(1, top, logits.gather(1, top))


@register
class PostHocReversal(Defence):
    """Post-hoc reversal (the Stingy repo's reverse script; METHOD.md section 7): keep the original's top-1 (by
    its argmax) and reverse the order of all the other logits, [5,3,2,1,0] -> [5,0,1,2,3]. Training-free:
    the control for whether *training* the reversal (RML) buys anything over applying it."""
    name, label = "posthoc", "post-hoc reversal"
    keys = {}
    trained = False

    version = 2  # 1 could tie the kept top-1 with a reversed value (bf16 logits), changing the argmax

    @staticmethod
    def transform(logits, settings):
        """Reverse around the argmax; where the top non-target value of the reversed row equals the kept top-1
        (a tie at the top of the original, common with bf16 logits), the top-1 is raised to the next float, so
        the defended argmax is always the original's."""
        z = logits.float()
        top = z.argmax(1, keepdim=True)
        out = reverse_logits(z, top.squeeze(1))
        kept = out.gather(1, top)
        rest = out.scatter(1, top, float("-inf")).max(dim=1, keepdim=True).values
        bumped = torch.where(rest >= kept, torch.nextafter(rest, torch.full_like(rest, float("inf"))), kept)
        return out.scatter(1, top, bumped)


class DefendedModel(torch.nn.Module):
    """The original model answering through a training-free defence's transform."""

    def __init__(self, model, name, settings):
        super().__init__()
        self.model, self.defence, self.settings = model, name, dict(settings)

    def forward(self, x):
        return DEFENCES[self.defence].transform(self.model(x), self.settings)
