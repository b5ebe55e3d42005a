"""Loss functions: RML (possessive teacher), Nasty Teacher, and the KD / DKD / DFAD attacks.

Pure functions on logits. Softmax, log-softmax and KL run in float32 (or float64 when given float64) so
they are safe under bf16/fp16 autocast. Each loss returns a dict of named terms that the engine sums.
Equations follow docs/METHOD.md; KL(p||q) = sum_i p_i (log p_i - log q_i), summed over classes and
averaged over the batch ("batchmean").
"""
import torch
import torch.nn.functional as F

# Offset of the ground-truth mask in q_hat(z) = softmax((z - 1000 * m) / tau), as in METHOD.md section 2.
# A finite constant rather than -inf: the target's log-probability stays finite, so 0 * log 0 never
# turns into 0 * -inf = NaN in a KL, and float64 gradcheck sees a smooth function.
NON_TARGET_MASK = 1000.0

REVERSE_SCOPES = ("non_target", "all")


# ----------------------------------------------------------------------------------------- checks
def check_logits(logits, name="logits"):
    if not torch.is_tensor(logits) or logits.dim() != 2:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N, C), got {shape}")


def check_target(target, logits, name="target"):
    if not torch.is_tensor(target) or target.dim() != 1 or target.shape[0] != logits.shape[0]:
        shape = tuple(target.shape) if torch.is_tensor(target) else type(target).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {logits.shape[0]} class indices, got {shape}")


def check_pair(a, b, names):
    check_logits(a, names[0])
    check_logits(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same shape")


def check_tau(tau):
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def _fp(x):
    """float32 view of half/bf16 tensors; float64 is kept (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _zero(like):
    return torch.zeros((), dtype=_fp(like).dtype, device=like.device)


def kl_divergence(log_p, log_q):
    """KL(p||q) batchmean from log-probabilities: sum_i p_i (log p_i - log q_i), mean over rows.

    Both inputs are finite log-probabilities (our masks use a finite offset), so entries with p_i = 0
    contribute exp(log p_i) * (...) = 0 exactly: the 0 * log 0 = 0 convention without xlogy, and with
    finite gradients everywhere.
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


# --------------------------------------------------------------------------------------- reversal
def reverse_logits(logits, target, scope="non_target"):
    """Reverse the rank order of the logits: r = reverse(z, y) (METHOD.md section 2).

    scope="non_target": among the C-1 non-target classes, the k-th highest receives the value of the
    k-th lowest; r_y = z_y. scope="all": the same over all C classes, target included (ablation only).

    r is a permutation of each row of z (same values, same entropy), and z_i > z_j implies r_i < r_j for
    the reversed classes when values are distinct (r_i <= r_j where values tie). Ties are broken
    deterministically by class index (stable sort: among equal values the lower index ranks higher).

    Involution: reverse(reverse(z)) == z exactly when the reversed values are distinct, and more
    generally whenever the mirror image of each tie group's rank interval is a tie group's interval.
    With arbitrary ties no rule can be: for non-target values (3, 3, 1) on classes (a, b, c), a valid
    reversal must give c a 3 (c is strictly below a and b) and the 1 to a or b, so each of the three
    arrangements has exactly the other two as valid reversals and none is its own; a map on three
    points without fixed points is never its own inverse. Here reverse(reverse(z)) is then a different
    valid arrangement of the same values.

    The output keeps the input's dtype; gradients (if any) flow through gather/scatter.
    """
    check_logits(logits)
    check_target(target, logits)
    if scope not in REVERSE_SCOPES:
        raise ValueError(f"unknown reverse scope {scope!r}; valid: {', '.join(REVERSE_SCOPES)}")
    c = logits.shape[1]
    # rank order, highest first; stable so ties rank by class index
    order = torch.sort(_fp(logits.detach()), dim=1, descending=True, stable=True).indices
    if scope == "non_target":
        # move the target to rank 0 and keep the others' relative order (robust to +-inf logits)
        not_target = (order != target.unsqueeze(1)).to(torch.int8)
        order = order.gather(1, torch.sort(not_target, dim=1, stable=True).indices)
        # rank 0 (target) stays; ranks 1..C-1 map to C-1..1
        src_rank = torch.arange(c, 0, -1, device=logits.device) % c  # [0, C-1, C-2, ..., 1]
    else:
        src_rank = torch.arange(c - 1, -1, -1, device=logits.device)
    values = logits.gather(1, order[:, src_rank])  # value that lands on the class at each rank
    return torch.zeros_like(logits).scatter(1, order, values)


# ---------------------------------------------------------------------------- decoupled probabilities
def binary_log_probs(logits, target, tau):
    """log b(z) = [log p_y, log(1 - p_y)], p = softmax(z / tau); shape (N, 2).

    1 - p_y is computed in log space as logsumexp over the non-target classes minus logsumexp over all
    classes, so it stays exact when p_y -> 1 (no log(1 - p) cancellation).
    """
    check_logits(logits)
    check_target(target, logits)
    check_tau(tau)
    s = _fp(logits) / tau
    mask = F.one_hot(target, s.shape[1]).bool()
    lse_all = torch.logsumexp(s, dim=1)
    log_py = s.gather(1, target.unsqueeze(1)).squeeze(1) - lse_all
    log_rest = torch.logsumexp(s.masked_fill(mask, float("-inf")), dim=1) - lse_all
    return torch.stack([log_py, log_rest], dim=1)


def binary_probs(logits, target, tau):
    """b(z) = [p_y, 1 - p_y] with p = softmax(z / tau); shape (N, 2), rows sum to 1."""
    return binary_log_probs(logits, target, tau).exp()


def non_target_log_probs(logits, target, tau):
    """log q_hat(z) = log_softmax((z - 1000 * m) / tau), m = one_hot(y); shape (N, C).

    The finite offset NON_TARGET_MASK (METHOD.md) masks the target: its log-probability is about
    -(1000 - (z_y - max z))/tau, i.e. its probability underflows to exactly 0 in float32 for tau up to about 8,
    is ~1e-22 at tau = 20 and grows with tau (about e^-10 at tau = 100).
    """
    check_logits(logits)
    check_target(target, logits)
    check_tau(tau)
    z = _fp(logits)
    m = F.one_hot(target, z.shape[1]).to(z.dtype)
    return F.log_softmax((z - NON_TARGET_MASK * m) / tau, dim=1)


def non_target_probs(logits, target, tau):
    """q_hat(z) = softmax((z - 1000 * m) / tau): the non-target distribution renormalised over C-1 classes."""
    return non_target_log_probs(logits, target, tau).exp()


# ----------------------------------------------------------------------------------------- losses
def rml_loss(student_logits, original_logits, target, tau=4.0, alpha=1.0, beta=1.0, gamma=0.0,
             scope="non_target"):
    """Reversed Maximization Learning loss for the possessive teacher z^p (METHOD.md section 2).

        L_RML = CE(z^p, y)                                  -> "ce"
              + alpha tau^2 KL(b(z^o)     || b(z^p))        -> "binary"
              + beta  tau^2 KL(q_hat(r)   || q_hat(z^p))    -> "reversed",  r = reverse_logits(z^o, y, scope)
              - gamma tau^2 KL(q_hat(z^o) || q_hat(z^p))    -> "maximize"

    student_logits = z^p (being trained); original_logits = z^o from the frozen original, detached here.
    A term whose weight is 0 is returned as an exact 0 tensor (not computed).
    """
    check_pair(student_logits, original_logits, ("student_logits", "original_logits"))
    check_target(target, student_logits)
    check_tau(tau)
    if scope not in REVERSE_SCOPES:
        raise ValueError(f"unknown reverse scope {scope!r}; valid: {', '.join(REVERSE_SCOPES)}")
    z_p = _fp(student_logits)
    z_o = _fp(original_logits.detach())
    t2 = tau * tau
    terms = {"ce": F.cross_entropy(z_p, target)}
    if alpha:
        terms["binary"] = alpha * t2 * kl_divergence(binary_log_probs(z_o, target, tau),
                                                     binary_log_probs(z_p, target, tau))
    else:
        terms["binary"] = _zero(z_p)
    log_q_p = non_target_log_probs(z_p, target, tau) if (beta or gamma) else None
    if beta:
        r = reverse_logits(z_o, target, scope)
        terms["reversed"] = beta * t2 * kl_divergence(non_target_log_probs(r, target, tau), log_q_p)
    else:
        terms["reversed"] = _zero(z_p)
    if gamma:
        terms["maximize"] = -gamma * t2 * kl_divergence(non_target_log_probs(z_o, target, tau), log_q_p)
    else:
        terms["maximize"] = _zero(z_p)
    return terms


def nasty_loss(logits, original_logits, target, tau=4.0, omega=0.04):
    """Nasty Teacher loss (Ma et al., ICLR 2021; METHOD.md section 3).

        L_nasty = CE(z^n, y)                                    -> "ce"
                - omega tau^2 KL(softmax(z^n/tau) || softmax(z^o/tau))   -> "nasty"

    The KL runs from the nasty teacher's distribution (z^n = logits, trained) to the frozen original's
    (z^o, detached here). Unbounded below by design.
    """
    check_pair(logits, original_logits, ("logits", "original_logits"))
    check_target(target, logits)
    check_tau(tau)
    z_n = _fp(logits)
    terms = {"ce": F.cross_entropy(z_n, target)}
    if omega:
        log_p_n = F.log_softmax(z_n / tau, dim=1)
        log_p_o = F.log_softmax(_fp(original_logits.detach()) / tau, dim=1)
        terms["nasty"] = -omega * tau * tau * kl_divergence(log_p_n, log_p_o)
    else:
        terms["nasty"] = _zero(z_n)
    return terms


def kd_loss(student_logits, teacher_logits, target, tau=4.0, alpha=0.9):
    """Vanilla KD (Hinton et al. 2015; METHOD.md section 4).

        L = (1 - alpha) CE(z^s, y)                                   -> "ce"  (0 when target is None)
          + alpha tau^2 KL(softmax(z^t/tau) || softmax(z^s/tau))     -> "kd"

    teacher_logits are NOT detached: run a frozen teacher under no_grad; a data-free generator step
    may backpropagate through them on purpose.
    """
    check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    check_tau(tau)
    z_s = _fp(student_logits)
    if target is not None and alpha != 1:
        check_target(target, student_logits)
        terms = {"ce": (1.0 - alpha) * F.cross_entropy(z_s, target)}
    else:
        terms = {"ce": _zero(z_s)}
    if alpha:
        log_p_t = F.log_softmax(_fp(teacher_logits) / tau, dim=1)
        terms["kd"] = alpha * tau * tau * kl_divergence(log_p_t, F.log_softmax(z_s / tau, dim=1))
    else:
        terms["kd"] = _zero(z_s)
    return terms


def dkd_loss(student_logits, teacher_logits, target, tau=4.0, alpha=1.0, beta=8.0, warmup=1.0):
    """Decoupled KD (Zhao et al., CVPR 2022), with the decoupling of METHOD.md section 2.

        L = CE(z^s, y)                                                  -> "ce"
          + warmup alpha tau^2 KL(b(z^t)     || b(z^s))                 -> "tckd"
          + warmup beta  tau^2 KL(q_hat(z^t) || q_hat(z^s))             -> "nckd"

    b = binary_probs, q_hat = non_target_probs (used here in log space: binary_log_probs,
    non_target_log_probs). warmup in [0, 1] is the caller's ramp (DKD uses min(epoch / 20, 1)).
    teacher_logits are not detached (see kd_loss).
    """
    check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    check_target(target, student_logits)
    check_tau(tau)
    z_s, z_t = _fp(student_logits), _fp(teacher_logits)
    t2 = tau * tau
    terms = {"ce": F.cross_entropy(z_s, target)}
    w_tc, w_nc = warmup * alpha, warmup * beta
    if w_tc:
        terms["tckd"] = w_tc * t2 * kl_divergence(binary_log_probs(z_t, target, tau),
                                                  binary_log_probs(z_s, target, tau))
    else:
        terms["tckd"] = _zero(z_s)
    if w_nc:
        terms["nckd"] = w_nc * t2 * kl_divergence(non_target_log_probs(z_t, target, tau),
                                                  non_target_log_probs(z_s, target, tau))
    else:
        terms["nckd"] = _zero(z_s)
    return terms


def dfad_discrepancy(student_logits, teacher_logits):
    """DFAD discrepancy D = mean |z^t - z^s| (L1 on logits, mean over all elements; Fang et al. 2019).

    Not detached on either side: the generator step maximises D through the frozen teacher.
    """
    check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    return (_fp(teacher_logits) - _fp(student_logits)).abs().mean()
