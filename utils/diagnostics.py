"""Per-batch diagnostics that show whether a defence took hold (METHOD.md section 5).

All functions run under no_grad, are batched, and return 0-d float32 tensors on the input's device, so
a caller can accumulate them without host syncs. Per-sample metrics take reduction="mean" (default) or
"sum" (for accumulating a per-image average over a test set); ECE is a set-level metric and should be
called on the concatenated logits of the whole test set.
"""
import torch
import torch.nn.functional as F

from utils.losses import (check_logits, check_pair, check_target, check_tau, kl_divergence,
                          non_target_log_probs)

# Kendall's tau builds (chunk, C, C) sign tensors; cap the chunk so memory stays around 3 * 4M floats
_KENDALL_MAX_ELEMENTS = 4 * 1024 * 1024


def _reduce(per_sample, reduction):
    if reduction == "mean":
        return per_sample.float().mean()
    if reduction == "sum":
        return per_sample.float().sum()
    raise ValueError(f"unknown reduction {reduction!r}; valid: mean, sum")


@torch.no_grad()
def non_target_kendall(logits_a, logits_b, target, reduction="mean"):
    """Kendall's tau between the non-target class orders of a and b, per sample, averaged over the batch.

        tau = (concordant - discordant) / ((C-1)(C-2)/2)

    over the pairs of non-target classes (tau-a: a pair tied in a or b counts as neither, so with ties
    |tau| < 1). +1 when a and b order the non-targets alike, -1 when a is the reversal of b
    (e.g. a = reverse_logits(b, y) with distinct values). Needs C >= 3.
    """
    check_pair(logits_a, logits_b, ("logits_a", "logits_b"))
    check_target(target, logits_a)
    n, c = logits_a.shape
    if c < 3:
        raise ValueError(f"Kendall's tau over non-target classes needs C >= 3, got C = {c}")
    keep = 1.0 - F.one_hot(target, c).float()  # zero the target's row and column of the pair matrix
    chunk = max(1, _KENDALL_MAX_ELEMENTS // (c * c))
    taus = []
    for start in range(0, n, chunk):  # chunks of samples bound memory; each chunk is fully batched
        a = logits_a[start:start + chunk].float()
        b = logits_b[start:start + chunk].float()
        k = keep[start:start + chunk]
        sa = torch.sign(a.unsqueeze(2) - a.unsqueeze(1))
        sb = torch.sign(b.unsqueeze(2) - b.unsqueeze(1))
        agree = sa * sb * k.unsqueeze(2) * k.unsqueeze(1)
        taus.append(agree.sum(dim=(1, 2)) / 2)  # each unordered pair appears twice; diagonal is 0
    num_pairs = (c - 1) * (c - 2) / 2
    return _reduce(torch.cat(taus) / num_pairs, reduction)


@torch.no_grad()
def reversed_top1_match(possessive_logits, original_logits, target, reduction="mean"):
    """Fraction of samples whose highest non-target class under the possessive teacher is the
    original's lowest non-target class (chance = 1/(C-1)). Ties resolve to the lowest class index."""
    check_pair(possessive_logits, original_logits, ("possessive_logits", "original_logits"))
    check_target(target, possessive_logits)
    mask = F.one_hot(target, possessive_logits.shape[1]).bool()
    top_p = possessive_logits.float().masked_fill(mask, float("-inf")).argmax(dim=1)
    low_o = original_logits.float().masked_fill(mask, float("inf")).argmin(dim=1)
    return _reduce(top_p == low_o, reduction)


@torch.no_grad()
def non_target_entropy(logits, target, tau, reduction="mean"):
    """Entropy (nats) of the non-target distribution q_hat(z) = non_target_probs(z, y, tau):
    H = -sum_i q_i log q_i; at most log(C-1), reached by uniform non-target logits."""
    log_q = non_target_log_probs(logits, target, tau).float()
    return _reduce(-(log_q.exp() * log_q).sum(dim=1), reduction)


@torch.no_grad()
def mean_kl(p_logits, q_logits, tau, reduction="mean"):
    """KL(softmax(p/tau) || softmax(q/tau)), summed over classes, averaged over the batch (no tau^2)."""
    check_pair(p_logits, q_logits, ("p_logits", "q_logits"))
    check_tau(tau)
    log_p = F.log_softmax(p_logits.float() / tau, dim=1)
    log_q = F.log_softmax(q_logits.float() / tau, dim=1)
    if reduction == "mean":
        return kl_divergence(log_p, log_q)
    return _reduce((log_p.exp() * (log_p - log_q)).sum(dim=1), reduction)


@torch.no_grad()
def expected_calibration_error(logits, target, n_bins=15):
    """ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)| with n_bins equal-width confidence bins (lo, hi].

    Confidence is the top softmax probability at temperature 1; acc is top-1 correctness. A set-level
    metric: call it on the concatenated logits of the whole test set.
    """
    check_logits(logits)
    check_target(target, logits)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = F.softmax(logits.float(), dim=1).max(dim=1)
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    gap = torch.zeros(n_bins, dtype=torch.float32, device=logits.device)
    gap.index_add_(0, bins, (pred == target).float() - conf)  # per bin: sum(acc) - sum(conf)
    return gap.abs().sum() / max(logits.shape[0], 1)


__all__ = [
    "non_target_kendall",
    "reversed_top1_match",
    "non_target_entropy",
    "mean_kl",
    "expected_calibration_error",
]


@torch.no_grad()
def class_response(logits, target, tau, num_classes=None):
    """Mean softmax response at temperature tau for each true class: a (C, C) tensor, row c = the mean
    of softmax(z / tau) over test images of class c (the bar charts of the Nasty Teacher paper)."""
    num_classes = num_classes or logits.shape[1]
    probs = torch.softmax(logits.float() / tau, dim=1)
    sums = torch.zeros(num_classes, logits.shape[1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, target, probs)
    counts = torch.bincount(target, minlength=num_classes).clamp(min=1).to(probs.dtype)
    return sums / counts[:, None]


def compare_to_original(logits, original_logits, target, tau):
    """How far a teacher answers from its original on a batch, summed over it (the engine averages): the KL at
    tau, the non-target entropy of both, and (three classes or more) the Kendall tau of their non-target
    orders and how often the teacher's top non-target class is the original's last."""
    out = {"kl_to_original": mean_kl(logits, original_logits, tau, reduction="sum"),
           "nt_entropy": non_target_entropy(logits, target, tau, reduction="sum"),
           "original_nt_entropy": non_target_entropy(original_logits, target, tau, reduction="sum")}
    if logits.shape[1] >= 3:
        out["kendall"] = non_target_kendall(logits, original_logits, target, reduction="sum")
        out["reversed_top1"] = reversed_top1_match(logits, original_logits, target, reduction="sum")
    return out
