"""Teachers trained elsewhere: the state dicts other KD codebases publish, read into this zoo's models.

A file is accepted in these forms (all loaded with weights_only=True):

* RepDistiller / mdistiller: ``{'model': state_dict, 'epoch': ..., 'optimizer': ...}``;
* Nasty-Teacher: ``{'state_dict': state_dict, 'epoch': ..., 'optim_dict': ...}``;
* pytorch-cifar: ``{'net': state_dict, 'acc': ..., 'epoch': ...}``;
* a plain state dict.

A ``module.`` (DataParallel / DistributedDataParallel) or ``_orig_mod.`` (torch.compile) prefix is dropped.
The zoo keeps its own parameter names (this project's checkpoints and their digests depend on them); a
file's names are translated when the architecture is one both codebases define the same way:

* RepDistiller's and mdistiller's CIFAR ResNets (models/resnet.py: resnet8/14/20/32/44/56/110, resnet8x4,
  resnet32x4): ``conv1``/``bn1`` are the zoo's ``stem.0``/``stem.1``, a block's ``downsample`` is its
  ``shortcut``;
* RepDistiller's and mdistiller's WRNs (models/wrn.py: wrn_16_1/16_2/40_1/40_2): ``blockN.layer.i`` is
  ``blockN.i``, ``convShortcut`` is ``shortcut``, the final ``bn1`` is ``bn``;
* the pytorch-cifar ResNets (Nasty-Teacher's model/resnet.py, RepDistiller's models/resnetv2.py:
  ResNet18/34/50): ``conv1``/``bn1`` are ``stem.0``/``stem.1``, ``linear`` is ``fc``.
"""
import re

import torch

# what a file holds its weights under, in the order they are looked for, and the codebase that writes it
_CONTAINERS = (("model", "a RepDistiller/mdistiller-style file"), ("state_dict", "a Nasty-Teacher-style file"),
               ("net", "a pytorch-cifar-style file"))
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_state_dict(obj):
    return (isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(torch.is_tensor(v) for v in obj.values()))


def find_state_dict(obj):
    """(state dict, what kind of file held it) from a loaded file, or (None, None) when it holds none."""
    if is_state_dict(obj):
        return obj, "a plain state dict"
    if isinstance(obj, dict):
        for key, kind in _CONTAINERS:
            if is_state_dict(obj.get(key)):
                return obj[key], kind
    return None, None


def strip_wrappers(state):
    """The state dict without the prefixes DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`)
    put on every key, in any nesting."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _rules(*pairs):
    compiled = [(re.compile(p), r) for p, r in pairs]

    def rename(key):
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        return key
    return rename


# RepDistiller models/resnet.py, mdistiller models/cifar/resnet.py
_CIFAR_RESNET = _rules((r"^conv1\.", "stem.0."), (r"^bn1\.", "stem.1."), (r"\.downsample\.", ".shortcut."))
# RepDistiller models/wrn.py, mdistiller models/cifar/wrn.py
_WRN = _rules((r"^(block\d)\.layer\.", r"\1."), (r"\.convShortcut\.", ".shortcut."), (r"^bn1\.", "bn."))
# pytorch-cifar ResNet: Nasty-Teacher model/resnet.py, RepDistiller models/resnetv2.py
_PYTORCH_CIFAR_RESNET = _rules((r"^conv1\.", "stem.0."), (r"^bn1\.", "stem.1."), (r"^linear\.", "fc."))

TRANSLATIONS = {
    **{name: _CIFAR_RESNET for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                                        "resnet110", "resnet8x4", "resnet32x4")},
    **{name: _WRN for name in ("wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "wrn28_10")},
    **{name: _PYTORCH_CIFAR_RESNET for name in ("resnet18", "resnet34", "resnet50")},
}


def _first(keys, n=4):
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _problems(expected, state):
    """(missing, unexpected, wrong shapes) of a candidate state dict against the model's."""
    missing = {k for k in expected if k not in state and not k.endswith("num_batches_tracked")}
    unexpected = {k for k in state if k not in expected}
    shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in sorted(set(state) & set(expected))
              if tuple(state[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, shapes


def fit_state_dict(model, state, arch):
    """The state dict in the zoo's names for `model` (canonical `arch`), or a one-line account of why it does
    not fit: the first few missing and unexpected keys and any wrong shape.

    Returns (state, None) or (None, problem). BatchNorm's num_batches_tracked counters, absent from files
    written by old PyTorch versions and unused in eval mode, are taken from the model when missing.
    """
    expected = model.state_dict()
    state = strip_wrappers(state)
    candidates = [state]
    rename = TRANSLATIONS.get(arch)
    if rename is not None:
        translated = {rename(k): v for k, v in state.items()}
        if len(translated) == len(state) and translated != state:
            candidates.append(translated)
    scored = []
    for cand in candidates:
        missing, unexpected, shapes = _problems(expected, cand)
        if not (missing or unexpected or shapes):
            full = {k: cand.get(k, expected[k]) for k in expected}
            return full, None
        scored.append((len(missing) + len(unexpected) + len(shapes), missing, unexpected, shapes))
    _, missing, unexpected, shapes = min(scored, key=lambda s: s[0])
    parts = []
    if missing:
        parts.append(f"missing keys {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_first(unexpected)}")
    if shapes:
        key, got, want = shapes[0]
        more = f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""
        parts.append(f"{key} has shape {list(got)} in the file, {list(want)} in the model{more}")
    return None, "; ".join(parts)


class Renormalise(torch.nn.Module):
    """A model trained on inputs normalised with (mean, std) answering images normalised with the run's
    dataset statistics: x_model = (x * data_std + data_mean - mean) / std, per channel."""

    def __init__(self, model, data_mean, data_std, mean, std):
        super().__init__()
        self.model = model
        data_mean, data_std = torch.tensor(data_mean).view(1, -1, 1, 1), torch.tensor(data_std).view(1, -1, 1, 1)
        mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.register_buffer("scale", data_std / std, persistent=False)
        self.register_buffer("shift", (data_mean - mean) / std, persistent=False)

    def forward(self, x):
        return self.model(x * self.scale.to(x.dtype) + self.shift.to(x.dtype))
