"""Checkpoints written atomically (temp file, fsync, rename) and loaded with weights_only=True.

A checkpoint stores the architecture, class count, dataset and normalisation beside the weights, so a
model is always rebuilt from its checkpoint, never from a path or a folder name.
"""
import json
import os
import subprocess
import tempfile

import torch

from .constants import DATASETS
from .errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror}); choose a writable --save_path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; a result is as readable as any file written here
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UserError(f"writing {path} failed ({e.strerror or e}); the previous file is intact, "
                        f"free some space or choose another --save_path") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    """A JSON file's content, or None when it is missing or unreadable (a half-written or corrupt result is
    treated as no result: never a traceback)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_checkpoint(path, state):
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, what="checkpoint"):
    """Load a checkpoint safely: no pickled code runs (weights_only); any failure is one clear UserError."""
    if not path:
        raise UserError(f"no {what} given; set its path in params.json or on the command line")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found; train it first or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):  # a class or callable we do not load
            raise UserError(f"{what} {path} was refused: it holds objects other than tensors and plain data, "
                            f"which could run code when loaded; only load checkpoints you trust, re-saved as "
                            f"state dicts") from None
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__}: {first[:200]}); "
                        f"the file is truncated or corrupt") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise UserError(f"{what} {path} is not a checkpoint of this project (no 'model'/'arch' entries)")
    return ckpt


def unwrap(model):
    """The bare module behind DDP and torch.compile wrappers (so saved keys carry no prefixes)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def model_record(model, arch, dataset):
    """A weights-only record of a model (or of a state dict already in hand)."""
    info = DATASETS[dataset]
    state = model if isinstance(model, dict) else unwrap(model).state_dict()
    return {"model": state, "arch": arch, "num_classes": info.num_classes,
            "dataset": dataset, "mean": list(info.mean), "std": list(info.std)}


def finished_weights(path, what):
    """A run folder given where a checkpoint is expected means its finished weights: DIR/weights.pth when DIR
    holds a finished run (metrics.json beside it); any other path is returned as it is."""
    if not path or not os.path.isdir(path):
        return path
    weights = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(os.path.join(path, "metrics.json")) and os.path.isfile(weights):
        print(f"{what} {path} is a finished run folder: using its {weights}", flush=True)
        return weights
    raise UserError(f"{what} {path} is a folder that holds no finished run (no metrics.json and {WEIGHTS_FILE}); "
                    f"give a checkpoint file, or finish that run first")


def build_from_checkpoint(path, what, dataset=None, num_classes=None):
    """Rebuild the model stored in a checkpoint, check it against what the command expects, load weights."""
    import models
    ckpt = load_checkpoint(path, what)
    if dataset is not None and ckpt.get("dataset") != dataset:
        raise UserError(f"{what} {path} was trained on {ckpt.get('dataset')}, this run uses {dataset}; "
                        f"use a {dataset} {what} or set dataset to {ckpt.get('dataset')}")
    if num_classes is not None and ckpt.get("num_classes") != num_classes:
        raise UserError(f"{what} {path} has {ckpt.get('num_classes')} classes, this run needs {num_classes}")
    try:
        model = models.build(ckpt["arch"], ckpt["num_classes"])
    except ValueError as e:
        raise UserError(f"{what} {path}: {e}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{what} {path}: its weights do not fit architecture '{ckpt['arch']}' "
                        f"({str(e).splitlines()[0][:160]})") from None
    spec = ckpt.get("defence")
    if spec:  # a training-free defence: the original's weights answering through the defence
        from .defences import DEFENCES, DefendedModel
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in DEFENCES or DEFENCES[name].trained:
            raise UserError(f"{what} {path} names defence '{name}', which is not a training-free defence of this "
                            f"version ({', '.join(n for n, d in DEFENCES.items() if not d.trained)})")
        runtime = {}
        if DEFENCES[name].needs_key:
            from .defences import checked_key
            key, problem = checked_key(os.path.dirname(os.path.abspath(path)), dict(spec, name=name))
            if problem:
                raise UserError(f"{what} {path} is keyed ({name}) and cannot answer: {problem}")
            runtime = DEFENCES[name].runtime(spec, key, ckpt["num_classes"])
        model = DefendedModel(model, name, spec, runtime)
    return model, ckpt


def freeze(model):
    """A frozen model: eval mode (BN uses running stats), no gradients into its weights."""
    model.eval()
    model.requires_grad_(False)
    return model


def git_commit():
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip()
        return commit if out.returncode == 0 and len(commit) == 40 else None
    except (OSError, subprocess.SubprocessError):
        return None


# The weights-only file every finished run leaves beside metrics.json: what later steps load and what a
# release ships (no optimizer state, no history); its weights' digest is recorded in metrics.json.
WEIGHTS_FILE = "weights.pth"


def weights_sha256(state_dict):
    """sha256 of a state dict's tensors (names, dtypes, shapes, bytes), independent of the file they sit in:
    a run's last.pth and its weights-only export give the same digest."""
    import hashlib
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not torch.is_tensor(t):
            h.update(f"{key}={t!r};".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_digest(ckpt):
    """The digest that identifies a teacher: its weights' sha256, combined with the defence's name and
    settings when the file is a training-free defence of those weights (two defences of one original differ)."""
    digest = weights_sha256(ckpt["model"])
    if ckpt.get("defence"):
        import hashlib
        spec = json.dumps(ckpt["defence"], sort_keys=True)
        digest = hashlib.sha256(f"{digest}:{spec}".encode()).hexdigest()
    return digest


def input_record(path, ckpt):
    """What a run records of a checkpoint it loaded: the path as given and the digest of its weights."""
    return {"path": path, "weights_sha256": checkpoint_digest(ckpt)}


def export_weights(path, record):
    """Write a weights-only checkpoint (arch, class count, dataset, normalisation, weights, and a training-free
    defence's name and settings); return its digest."""
    digest = checkpoint_digest(record)
    save_checkpoint(path, dict(record, weights_sha256=digest, format="weights-only"))
    return digest
