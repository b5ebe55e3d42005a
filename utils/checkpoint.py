"""Checkpoints written atomically (temp file, fsync, rename) and loaded with weights_only=True.

A checkpoint stores the architecture, class count, dataset and normalisation beside the weights, so a
model is always rebuilt from its checkpoint, never from a path or a folder name.
"""
import json
import os
import platform
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


def read_checkpoint_file(path, what="checkpoint"):
    """A checkpoint file's content, loaded safely: no pickled code runs (weights_only); any failure is one
    clear UserError."""
    if not path:
        raise UserError(f"no {what} given; set its path in params.json or on the command line")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found; train it first or fix the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):  # a class or callable we do not load
            raise UserError(f"{what} {path} was refused: it holds objects other than tensors and plain data, "
                            f"which could run code when loaded; only load checkpoints you trust, re-saved as "
                            f"state dicts (torch.save(ckpt['model'], 'teacher.pth'))") from None
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__}: {first[:200]}); "
                        f"the file is truncated or corrupt") from None


def is_project_checkpoint(ckpt):
    return isinstance(ckpt, dict) and "model" in ckpt and "arch" in ckpt


def load_checkpoint(path, what="checkpoint"):
    """A checkpoint of this project (weights with their architecture, class count, dataset, normalisation),
    loaded safely; any failure is one clear UserError. Teachers from elsewhere: rebuild_model."""
    ckpt = read_checkpoint_file(path, what)
    if not is_project_checkpoint(ckpt):
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


def unfinished_reason(path, ckpt):
    """Why a checkpoint of this project is not the end of a finished run (None when it is, or when the file
    does not say): a training checkpoint (last.pth, best.pth) holds an epoch short of its config's epochs, or
    sits in a folder without metrics.json. The weights.pth a finished run leaves is always finished."""
    if ckpt.get("format") == "weights-only" or "epoch" not in ckpt or not isinstance(ckpt.get("config"), dict):
        return None
    epochs = ckpt["config"].get("epochs")
    if isinstance(epochs, int) and isinstance(ckpt["epoch"], int) and ckpt["epoch"] < epochs:
        return f"it holds epoch {ckpt['epoch']} of {epochs}"
    if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.json")):
        return "its run wrote no metrics.json beside it"
    return None


def _check_stats(values, key):
    if values is None or len(values) == 0:
        return None
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"'{key}' must be 3 numbers, one per colour channel, got {json.dumps(values)}")
    if key.endswith("std") and not all(v > 0 for v in values):
        raise UserError(f"'{key}' must be > 0 for every channel, got {json.dumps(values)}")
    return [float(v) for v in values]


def _foreign_record(path, what, raw, dataset, num_classes, arch, mean, std):
    """A file from another codebase as a checkpoint of this project: its weights in the zoo's names, the
    architecture, class count and normalisation that the command line / config give."""
    import models
    from .foreign import find_state_dict, fit_state_dict
    state, kind = find_state_dict(raw)
    if state is None:
        keys = ", ".join(sorted(map(str, raw))[:6]) if isinstance(raw, dict) else type(raw).__name__
        raise UserError(f"{what} {path} holds no state dict (top-level entries: {keys}); give a checkpoint of this "
                        f"project, a state dict, or a file holding one under 'model', 'state_dict' or 'net'")
    hint = (f"pass the architecture it was trained as with --{what}_arch NAME (the zoo's name or RepDistiller's, "
            f"e.g. resnet32x4, wrn_40_2, resnet56, ResNet18; python train_scratch.py --list-models) and the "
            f"dataset it was trained on with --dataset")
    if not arch:
        raise UserError(f"{what} {path} is {kind}, which does not say its architecture; {hint}")
    if dataset is None:
        raise UserError(f"{what} {path} is {kind}, which does not say its dataset; pass --dataset")
    info = DATASETS[dataset]
    num_classes = num_classes or info.num_classes
    try:
        canonical = models.ALIASES.get(arch, arch)
        model = models.build(arch, num_classes)
    except ValueError as e:
        raise UserError(f"{what} {path}: {what}_arch: {e}") from None
    fitted, problem = fit_state_dict(model, state, canonical)
    if problem:
        raise UserError(f"{what} {path} ({kind}) does not fit architecture '{arch}' with {num_classes} classes "
                        f"({dataset}): {problem}; {hint}")
    return {"model": fitted, "arch": canonical, "num_classes": num_classes, "dataset": dataset,
            "mean": mean or list(info.mean), "std": std or list(info.std), "source_format": kind}


def rebuild_model(path, what, dataset=None, num_classes=None, arch=None, mean=None, std=None, allow_unfinished=False):
    """Rebuild the model stored in a checkpoint, check it against what the command expects, load weights.

    what: "teacher" or "original", the role the file plays, which also names its keys ({what}_arch,
    {what}_mean, {what}_std, allow_unfinished_{what}) in the messages.
    A checkpoint of this project says its architecture, class count, dataset and normalisation; a training
    checkpoint of a run that did not finish is refused unless allow_unfinished. A file from another codebase
    (utils/foreign.py: RepDistiller, mdistiller, Nasty-Teacher, a plain state dict, a `module.` prefix) says
    none of them: `arch`, the run's dataset and class count, and `mean`/`std` (default: the dataset's) do.
    A model trained with another normalisation than the dataset's is wrapped to see its own.
    Returns (model, ckpt), ckpt holding the weights in the zoo's names under 'model'. The teacher file of a
    training-free defence comes back as the original's model, the defence named in ckpt['defence']: scripts load
    teachers with utils.defences.build_from_checkpoint, which puts the defence around it.
    """
    import models
    raw = read_checkpoint_file(path, what)
    mean, std = _check_stats(mean, f"{what}_mean"), _check_stats(std, f"{what}_std")
    if is_project_checkpoint(raw) and "dataset" in raw:
        ckpt = raw
        if arch and models.ALIASES.get(arch, arch) != models.ALIASES.get(ckpt["arch"], ckpt["arch"]):
            raise UserError(f"{what} {path} is a '{ckpt['arch']}' checkpoint of this project, {what}_arch says "
                            f"'{arch}'; remove {what}_arch (this project's checkpoints name their architecture)")
        for key, given in ((f"{what}_mean", mean), (f"{what}_std", std)):
            recorded = ckpt.get(key.rsplit("_", 1)[1])
            if given and recorded and any(abs(a - b) > 1e-6 for a, b in zip(given, recorded)):
                raise UserError(f"{what} {path} records its normalisation ({key.rsplit('_', 1)[1]} {recorded}), "
                                f"{key} says {given}; remove {key}")
        if not allow_unfinished:
            why = unfinished_reason(path, ckpt)
            if why:
                folder = os.path.dirname(path) or "."
                raise UserError(f"{what} {path} is not the end of a finished run ({why}); use the weights a "
                                f"finished run leaves ({os.path.join(folder, WEIGHTS_FILE)}, written with "
                                f"metrics.json) or set allow_unfinished_{what} true to use it anyway")
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
            from .foreign import fit_state_dict
            _, problem = fit_state_dict(model, ckpt["model"], None)
            raise UserError(f"{what} {path}: its weights do not fit architecture '{ckpt['arch']}' "
                            f"({problem or str(e).splitlines()[0][:160]})") from None
    else:  # a file of another codebase; one that names its architecture but not its dataset counts as one
        arch = arch or (raw.get("arch") if isinstance(raw, dict) and isinstance(raw.get("arch"), str) else None)
        ckpt = _foreign_record(path, what, raw, dataset, num_classes, arch, mean, std)
        model = models.build(ckpt["arch"], ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
    data = DATASETS.get(dataset or ckpt.get("dataset"))
    if data is not None and ckpt.get("mean") and ckpt.get("std") and any(
            abs(a - b) > 1e-6 for a, b in zip(list(ckpt["mean"]) + list(ckpt["std"]), data.mean + data.std)):
        from .foreign import Renormalise
        model = Renormalise(model, data.mean, data.std, ckpt["mean"], ckpt["std"])
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


# The instruction sets that decide which fp32/bf16 kernels run on a CPU: two runs of one config on processors that
# differ here may part in the last bits (docs/RESULTS.md, p2: re-reversal from the original).
CPU_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def processor(device=None):
    """What computed a run, for metrics.json: the CPU's model name and which of CPU_ISA it has (from
    /proc/cpuinfo; the platform's name and no flags elsewhere), and the GPU's name when device is a CUDA one."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if name is not None and flags:
                    break
    except OSError:
        pass
    out = {"cpu": name or platform.processor() or platform.machine(), "cpu_isa": [f for f in CPU_ISA if f in flags]}
    if device is not None and torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


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


def file_sha256(path):
    """sha256 of a file's bytes, or None when it cannot be read: two steps whose metrics.json are the same bytes
    hold the same run (a sweep picked two ways shares its runs)."""
    import hashlib
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


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
