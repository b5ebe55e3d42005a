"""The registry of defences: every way a model owner protects the original model, one entry each.

A *trained* defence (RML, Nasty) fine-tunes or trains a teacher against the frozen original with its own
loss (`loss`). A *training-free* defence (Stingy, post-hoc reversal) keeps the original's weights and
changes its answers at query time (`transform`): its published teacher is the original's weights plus
the defence's name and settings, and `build_from_checkpoint` (every script's loader of a teacher or original)
rebuilds it wrapped (DefendedModel), so a thief queries the defended outputs whichever script loads it.

Each entry declares its config keys (train_possessive.py's keys are the union), checks them, names itself
for the report, and says what its own keys are set to on each dataset in the reproduction
(`dataset_settings`; reproduce.defence_params adds a preset's training schedule and overrides). Adding a
defence is one class here plus its test; train_possessive.py, the battery, report.py's table and figures
pick it up from DEFENCES.
"""
import hashlib
import os
import secrets

import torch

from . import registry
from .checkpoint import rebuild_model
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
    def dataset_settings(cls, dataset):
        """This defence's own keys as the reproduction sets them on `dataset` (e.g. the dataset's tau); keys
        left out keep their defaults. Nothing of a preset: reproduce.defence_params composes the step."""
        return {}

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

    needs_key = False  # a training-free transform keyed by a secret (see secret_key)

    @classmethod
    def runtime(cls, settings, key, num_classes):
        """What the transform needs beyond the recorded settings, derived from the secret key (never recorded)."""
        return {}

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
            raise UserError(f"{source}: 'reverse_scope' must be one of {', '.join(REVERSE_SCOPES)}, "
                            f"got '{cfg['reverse_scope']}'")
        _non_negative(cfg, ("alpha", "beta", "gamma", "beta_warmup"), source)

    @classmethod
    def dataset_settings(cls, dataset):
        return {"tau": DATASET_TAU[dataset], "alpha": 1.0, "beta": 1.0, "gamma": 0.0}

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
    dfad = True

    @classmethod
    def check(cls, cfg, source):
        _non_negative(cfg, ("omega",), source)

    @classmethod
    def dataset_settings(cls, dataset):
        return {"tau": DATASET_TAU[dataset], "omega": DATASET_OMEGA[dataset]}

    def loss(self, logits, original_logits, labels, progress):
        return nasty_loss(logits, original_logits, labels, self.cfg["tau"], self.cfg["omega"])


@register
class RMLNasty(Defence):
    """RML's loss plus Nasty's maximisation over the whole distribution (a variant of METHOD.md
    section 9): L = L_RML(alpha, beta, gamma) - omega tau^2 KL(p^tau(z) || p^tau(z^o)). RML's binary term copies
    the original's target-versus-rest confidence, which TCKD reads; Nasty's term moves that confidence too. With
    omega = 0 it is RML, with alpha = beta = gamma = 0 it is Nasty. The screening settings (dataset_settings) drop
    the binary term (alpha 0) and keep the reproduction's reversal weight (beta 0.3) and Nasty's omega."""
    name, label = "rmlnasty", "RML + Nasty"
    keys = dict(RML.keys, omega=Nasty.keys["omega"])

    @classmethod
    def check(cls, cfg, source):
        RML.check(cfg, source)
        Nasty.check(cfg, source)

    @classmethod
    def dataset_settings(cls, dataset):
        return {"tau": DATASET_TAU[dataset], "alpha": 0.0, "beta": 0.3, "gamma": 0.0,
                "omega": DATASET_OMEGA[dataset]}

    def loss(self, logits, original_logits, labels, progress):
        terms = RML.loss(self, logits, original_logits, labels, progress)
        terms["nasty"] = nasty_loss(logits, original_logits, labels, self.cfg["tau"], self.cfg["omega"])["nasty"]
        return terms


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
        return _bump_kept_top1(reverse_logits(z, top.squeeze(1)), top)


# The secret of a keyed defence: the environment variable, else this file beside the teacher's weights.pth
# (written by train_possessive.py with a fresh random key when neither exists; git-ignored). Only a
# fingerprint of it is recorded anywhere (key_sha256), never the key.
KEY_ENV = "DEFENCE_KEY"
KEY_FILE = "secret.key"


def key_fingerprint(key):
    return hashlib.sha256(f"defence-key:{key}".encode()).hexdigest()[:16]


def secret_key(folder, create=False):
    """(key, where it came from) for a keyed teacher in `folder`; (None, None) when there is none (create:
    write a fresh random one to folder/secret.key, readable by its owner only)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].strip(), f"${KEY_ENV}"
    path = os.path.join(folder, KEY_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            key = f.read().strip()
        if key:
            return key, path
    if not create:
        return None, None
    key = secrets.token_hex(16)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, path


def checked_key(folder, spec):
    """(key, None) for the keyed teacher recorded by `spec` (a teacher file's defence entry) in `folder`, or
    (None, why it cannot answer here); (None, None) for a defence that needs no key."""
    defence = DEFENCES.get(spec.get("name"))
    if defence is None or not defence.needs_key:
        return None, None
    key, where = secret_key(folder)
    if key is None:
        return None, (f"its secret key is not here (set ${KEY_ENV}, or put the owner's {KEY_FILE} in {folder}; "
                      f"the key's fingerprint is {spec.get('key_sha256')})")
    if key_fingerprint(key) != spec.get("key_sha256"):
        return None, (f"the key in {where} (fingerprint {key_fingerprint(key)}) is not the one it was made with "
                      f"({spec.get('key_sha256')})")
    return key, None


def key_problem(folder, spec):
    """Why the keyed teacher recorded by `spec` cannot answer here, or None (see checked_key)."""
    return checked_key(folder, spec)[1]


def _bump_kept_top1(out, top):
    """Raise the kept top-1 of each row to the next float above the rest where a value of the rest reaches
    it, so the defended argmax is always the original's."""
    kept = out.gather(1, top)
    rest = out.scatter(1, top, float("-inf")).max(dim=1, keepdim=True).values
    bumped = torch.where(rest >= kept, torch.nextafter(rest, torch.full_like(rest, float("inf"))), kept)
    return out.scatter(1, top, bumped)


def rank_permutations(key, num_classes):
    """(C, C-1) long tensor: row c is the secret permutation of the non-target ranks for top-1 class c."""
    rows = []
    for c in range(num_classes):
        seed = int.from_bytes(hashlib.sha256(f"{key}:{c}".encode()).digest()[:8], "little")
        rows.append(torch.randperm(num_classes - 1, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows)


def permute_ranks(logits, perms):
    """Keep each row's top-1; the non-target class of rank k (0: the highest non-target value) receives the
    value of rank perms[top-1][k]. perms[c] = (C-2, ..., 0) for every c is the post-hoc reversal."""
    z = logits.float()
    top = z.argmax(1, keepdim=True)
    order = z.scatter(1, top, float("inf")).argsort(dim=1, descending=True, stable=True)  # top-1 first
    ranked = z.gather(1, order)[:, 1:]  # non-target values, highest first
    moved = ranked.gather(1, perms.to(z.device)[top.squeeze(1)])
    return _bump_kept_top1(z.scatter(1, order[:, 1:], moved), top)


def fix_confidence(logits, confidence, tau):
    """Set each row's top-1 logit so that softmax(z / tau) gives it probability `confidence` exactly: the
    target-versus-rest split at tau is [c, 1 - c] for every image, whatever the original's confidence. Where
    that would not keep the top-1 above the rest (a c below what the rest allows), it is kept just above."""
    z = logits.float()
    top = z.argmax(1, keepdim=True)
    rest = torch.logsumexp(z.scatter(1, top, float("-inf")) / tau, dim=1, keepdim=True)
    wanted = tau * (rest + torch.logit(torch.tensor(confidence, device=z.device)))
    return _bump_kept_top1(z.scatter(1, top, wanted), top)


@register
class KeyedPermutation(Defence):
    """Keyed permutation (a variant against re-reversal, METHOD.md section 9): the original's top-1 is kept and its
    non-target ranks are permuted by a secret permutation chosen by the top-1 class (rank_permutations of
    the owner's key), in place of the public reversal a thief can undo. keyed_confidence > 0 also fixes the
    target-versus-rest split at keyed_tau to [c, 1 - c] (fix_confidence), against TCKD, which reads the
    original's per-image confidence. Training-free; the key is never recorded, only its fingerprint."""
    name, label = "keyed", "keyed permutation"
    keys = {"keyed_confidence": 0.0, "keyed_tau": 4.0}
    trained = False
    needs_key = True
    battery = False  # screened first: reproduce.py --defences keyed,keyedflat

    @classmethod
    def check(cls, cfg, source):
        if not 0 <= cfg["keyed_confidence"] < 1:
            raise UserError(f"{source}: 'keyed_confidence' must be in [0, 1) (0: not fixed), "
                            f"got {cfg['keyed_confidence']}")
        if not cfg["keyed_tau"] > 0:
            raise UserError(f"{source}: 'keyed_tau' must be > 0, got {cfg['keyed_tau']}")

    @classmethod
    def runtime(cls, settings, key, num_classes):
        return {"perms": rank_permutations(key, num_classes)}

    @staticmethod
    def transform(logits, settings):
        out = permute_ranks(logits, settings["perms"])
        if settings["keyed_confidence"] > 0:
            out = fix_confidence(out, settings["keyed_confidence"], settings["keyed_tau"])
        return out


@register
class KeyedFlat(KeyedPermutation):
    """The keyed permutation with the target-versus-rest split fixed at [0.9, 0.1] at tau 4: against
    re-reversal and TCKD at once (the battery's settings; any keyed_confidence works with method keyed)."""
    name, label = "keyedflat", "keyed permutation, fixed confidence"

    @classmethod
    def check(cls, cfg, source):
        super().check(cfg, source)
        if cfg.get("method") == cls.name and not cfg["keyed_confidence"] > 0:
            raise UserError(f"{source}: method keyedflat fixes the confidence: set 'keyed_confidence' in (0, 1), "
                            f"e.g. 0.9 (method keyed permutes without fixing it)")

    @classmethod
    def dataset_settings(cls, dataset):
        return dict(super().dataset_settings(dataset), keyed_confidence=0.9, keyed_tau=DATASET_TAU[dataset])


class DefendedModel(torch.nn.Module):
    """The original model answering through a training-free defence's transform (runtime: what a keyed
    defence derives from its secret key; held in memory, never saved)."""

    def __init__(self, model, name, settings, runtime=None):
        super().__init__()
        self.model, self.defence, self.settings = model, name, dict(settings)
        self._answer = dict(self.settings, **(runtime or {}))  # what the transform reads: recorded + runtime

    def forward(self, x):
        return DEFENCES[self.defence].transform(self.model(x), self._answer)


def build_from_checkpoint(path, what, dataset=None, num_classes=None, arch=None, mean=None, std=None,
                          allow_unfinished=False):
    """The model a checkpoint answers with: checkpoint.rebuild_model (the stored model, checked against what the
    command expects; its arguments), and for the teacher file of a training-free defence the original's model
    answering through that defence (a keyed one with its secret key, or one clear UserError). Returns (model,
    ckpt) as rebuild_model does."""
    model, ckpt = rebuild_model(path, what, dataset=dataset, num_classes=num_classes, arch=arch, mean=mean, std=std,
                                allow_unfinished=allow_unfinished)
    spec = ckpt.get("defence")
    if spec:  # a training-free defence: the original's weights answering through the defence
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in DEFENCES or DEFENCES[name].trained:
            raise UserError(f"{what} {path} names defence '{name}', which is not a training-free defence of this "
                            f"version ({', '.join(n for n, d in DEFENCES.items() if not d.trained)})")
        runtime = {}
        if DEFENCES[name].needs_key:
            key, problem = checked_key(os.path.dirname(os.path.abspath(path)), dict(spec, name=name))
            if problem:
                raise UserError(f"{what} {path} is keyed ({name}) and cannot answer: {problem}")
            runtime = DEFENCES[name].runtime(spec, key, ckpt["num_classes"])
        model = DefendedModel(model, name, spec, runtime)
    return model, ckpt
