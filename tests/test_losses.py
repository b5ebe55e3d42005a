"""Tests for utils/losses.py: reversal invariants (METHOD.md section 2), each loss against an independent
float64 re-computation of its formula, gradcheck, ablation identities, and bf16 autocast safety."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.defences import RML, Nasty, RMLNasty
from utils.losses import (NON_TARGET_MASK, binary_probs, dfad_discrepancy, dkd_loss, kd_loss, nasty_loss,
                          non_target_probs, reverse_logits, rml_loss)


def _batch(n, c, seed, ties=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if ties:
        z = torch.randint(-3, 4, (n, c), generator=g).to(dtype)
    else:
        z = torch.randn(n, c, generator=g, dtype=torch.float64).mul(3).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


def _sum(terms):
    return sum(terms.values())


# ------------------------------------------------------------------- float64 references (numpy, loops)
def _log_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    m = v.max()
    return v - m - math.log(np.exp(v - m).sum())


def _kl_ref(log_p, log_q):
    p = np.exp(log_p)
    return float(sum(pi * (lp - lq) for pi, lp, lq in zip(p, log_p, log_q) if pi > 0))


def _ce_ref(z, y):
    return float(np.mean([-_log_softmax(row)[t] for row, t in zip(z, y)]))


def _binary_ref(row, t, tau):
    p = np.exp(_log_softmax(row / tau))
    return np.log(np.array([p[t], p.sum() - p[t]]))  # 1 - p_y as the sum of the others


def _non_target_ref(row, t, tau):
    m = np.zeros_like(row)
    m[t] = 1.0
    return _log_softmax((row - 1000.0 * m) / tau)


def _reverse_ref(row, t):
    """Distinct values only: k-th highest non-target takes the k-th lowest non-target's value."""
    nt = sorted((i for i in range(len(row)) if i != t), key=lambda i: -row[i])
    out = row.copy()
    for k, i in enumerate(nt):
        out[i] = row[nt[len(nt) - 1 - k]]
    return out


def _batch_kl(fn_p, fn_q, zp, zq, y, tau):
    return float(np.mean([_kl_ref(fn_p(a, t, tau), fn_q(b, t, tau)) for a, b, t in zip(zp, zq, y)]))


def _soft(row, t, tau):
    return _log_softmax(row / tau)


# ------------------------------------------------------------------------------------ reverse_logits
def _assert_valid_reversal(z, y, r, scope):
    n, c = z.shape
    assert r.shape == z.shape and r.dtype == z.dtype
    assert torch.equal(r.sort(dim=1).values, z.sort(dim=1).values), "not a permutation of each row"
    reversed_cls = torch.ones(n, c, dtype=torch.bool)
    if scope == "non_target":
        assert torch.equal(r.gather(1, y[:, None]), z.gather(1, y[:, None])), "target value changed"
        reversed_cls[torch.arange(n), y] = False
    pair = reversed_cls[:, :, None] & reversed_cls[:, None, :]
    higher = (z[:, :, None] > z[:, None, :]) & pair  # z_i > z_j
    assert not (higher & (r[:, :, None] > r[:, None, :])).any(), "z_i > z_j but r_i > r_j"
    distinct_rows = (z[:, :, None] != z[:, None, :]) | torch.eye(c, dtype=torch.bool)
    distinct_rows = distinct_rows.all(dim=2).all(dim=1)
    strict = higher[distinct_rows] & (r[distinct_rows][:, :, None] >= r[distinct_rows][:, None, :])
    assert not strict.any(), "distinct values: z_i > z_j must give r_i < r_j"


@pytest.mark.parametrize("scope", ["non_target", "all"])
@pytest.mark.parametrize("c", [2, 10, 100])
@pytest.mark.parametrize("ties", [False, True])
def test_reverse_is_an_order_reversing_permutation(c, scope, ties):
    z, y = _batch(64, c, seed=c, ties=ties)
    r = reverse_logits(z, y, scope)
    _assert_valid_reversal(z, y, r, scope)
    assert torch.equal(reverse_logits(z, y, scope), r), "not deterministic"


@pytest.mark.parametrize("scope", ["non_target", "all"])
@pytest.mark.parametrize("c", [2, 10, 100])
def test_reverse_is_an_involution_on_distinct_values(c, scope):
    z, y = _batch(64, c, seed=7 + c)
    r = reverse_logits(z, y, scope)
    assert torch.equal(reverse_logits(r, y, scope), z)


def test_reverse_matches_loop_reference_and_rows_are_independent():
    z, y = _batch(16, 7, seed=3, dtype=torch.float64)
    r = reverse_logits(z, y)
    for i in range(16):
        np.testing.assert_array_equal(r[i].numpy(), _reverse_ref(z[i].numpy(), int(y[i])))
        assert torch.equal(reverse_logits(z[i:i + 1], y[i:i + 1]), r[i:i + 1])


def test_reverse_two_classes():
    z, y = _batch(32, 2, seed=1, ties=True)
    assert torch.equal(reverse_logits(z, y), z)  # one non-target class: identity
    assert torch.equal(reverse_logits(z, y, "all"), z.flip(1))


def _mirror_symmetric_ties(n, c, seed):
    """Rows whose non-target tie groups have palindromic sizes, e.g. (2, 1, 3, 1, 2) for C-1 = 9."""
    rng = np.random.default_rng(seed)
    z, y = np.zeros((n, c)), rng.integers(0, c, n)
    for i in range(n):
        sizes, left = [], (c - 1) // 2
        while left:
            sizes.append(int(rng.integers(1, left + 1)))
            left -= sizes[-1]
        middle = [c - 1 - 2 * sum(sizes)] if (c - 1) % 2 else []
        sizes = sizes + middle + sizes[::-1]
        values = np.repeat(np.arange(len(sizes), 0, -1, dtype=np.float64), sizes)
        nt = [j for j in range(c) if j != y[i]]
        z[i, nt] = rng.permutation(values)
        z[i, y[i]] = rng.integers(0, len(sizes) + 1)  # may tie with non-targets too
    return torch.from_numpy(z).float(), torch.from_numpy(y)


@pytest.mark.parametrize("c", [6, 10, 101])
def test_reverse_is_an_involution_on_mirror_symmetric_ties(c):
    z, y = _mirror_symmetric_ties(32, c, seed=c)
    r = reverse_logits(z, y)
    _assert_valid_reversal(z, y, r, "non_target")
    assert torch.equal(reverse_logits(r, y), z)


def test_reverse_with_asymmetric_ties_cannot_be_an_involution():
    """Non-target values (3, 3, 1): every valid reversal of each arrangement is one of the other two
    arrangements, so no deterministic rule satisfies both the order property and involution. The
    implementation's tie rule (lower class index ranks higher) is pinned here."""
    y = torch.tensor([0])
    arrangements = [torch.tensor([[9.0, 3, 3, 1]]), torch.tensor([[9.0, 3, 1, 3]]), torch.tensor([[9.0, 1, 3, 3]])]
    for z in arrangements:
        r = reverse_logits(z, y)
        _assert_valid_reversal(z, y, r, "non_target")
        assert not torch.equal(r, z)
        assert any(torch.equal(r, a) for a in arrangements)
    assert torch.equal(reverse_logits(arrangements[0], y), arrangements[2])


def test_reverse_keeps_dtype_and_handles_infinite_target():
    z, y = _batch(8, 10, seed=2, dtype=torch.bfloat16)
    assert reverse_logits(z, y).dtype == torch.bfloat16
    z, y = _batch(8, 10, seed=2)
    z[torch.arange(8), y] = float("-inf")
    _assert_valid_reversal(z, y, reverse_logits(z, y), "non_target")


def test_reverse_rejects_bad_input():
    z, y = _batch(4, 5, seed=0)
    with pytest.raises(ValueError, match="scope"):
        reverse_logits(z, y, "top")
    with pytest.raises(ValueError, match="2-D"):
        reverse_logits(z[0], y)
    with pytest.raises(ValueError, match="target"):
        reverse_logits(z, y[:3])
    with pytest.raises(ValueError, match="target"):
        reverse_logits(z, y[:, None])


def test_reverse_gradcheck():
    z, y = _batch(3, 6, seed=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: reverse_logits(t, y), (z.requires_grad_(),))


# ------------------------------------------------------------------------------- decoupled probabilities
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_binary_and_non_target_probs(tau):
    z, y = _batch(64, 10, seed=11)
    b = binary_probs(z, y, tau)
    assert b.shape == (64, 2) and b.dtype == torch.float32
    torch.testing.assert_close(b.sum(1), torch.ones(64))
    torch.testing.assert_close(b[:, 0], F.softmax(z / tau, 1)[torch.arange(64), y])
    q = non_target_probs(z, y, tau)
    assert q.shape == (64, 10)
    assert (q[torch.arange(64), y] < 1e-30).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    # renormalised over the C-1 non-target classes
    p = F.softmax(z / tau, 1)
    p[torch.arange(64), y] = 0
    torch.testing.assert_close(q, p / p.sum(1, keepdim=True))


def test_binary_probs_confident_rows_stay_finite():
    z = torch.tensor([[50.0, 0.0, -5.0]])
    b = binary_probs(z, torch.tensor([0]), 1.0)
    # 1 - p_y is kept in log space: in float32 1 - p_y would round to exactly 0 (and log to -inf)
    assert b[0, 0] == 1.0
    torch.testing.assert_close(b[0, 1], torch.tensor(math.exp(-50) * (1 + math.exp(-5))))


def test_mask_constant_is_methods():
    assert NON_TARGET_MASK == 1000.0


# ---------------------------------------------------------------------------------- float64 references
N, C, TAU = 6, 7, 3.0


@pytest.fixture
def pair64():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    zo = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,), generator=g)
    return zs, zo, y


@pytest.mark.parametrize("scope", ["non_target", "all"])
def test_rml_matches_reference(pair64, scope):
    zs, zo, y = pair64
    alpha, beta, gamma = 0.7, 1.3, 0.4
    t = rml_loss(zs, zo, y, tau=TAU, alpha=alpha, beta=beta, gamma=gamma, scope=scope)
    assert set(t) == {"ce", "binary", "reversed", "maximize"}
    a, b, yy = zs.numpy(), zo.numpy(), y.numpy()
    if scope == "non_target":
        r = np.stack([_reverse_ref(row, int(k)) for row, k in zip(b, yy)])
    else:
        r = np.stack([np.sort(row)[np.argsort(np.argsort(-row))] for row in b])  # k-th highest <- k-th lowest
    ref = {
        "ce": _ce_ref(a, yy),
        "binary": alpha * TAU ** 2 * _batch_kl(_binary_ref, _binary_ref, b, a, yy, TAU),
        "reversed": beta * TAU ** 2 * _batch_kl(_non_target_ref, _non_target_ref, r, a, yy, TAU),
        "maximize": -gamma * TAU ** 2 * _batch_kl(_non_target_ref, _non_target_ref, b, a, yy, TAU),
    }
    for k, v in ref.items():
        assert abs(t[k].item() - v) < 1e-6, (k, t[k].item(), v)


def test_nasty_matches_reference(pair64):
    zn, zo, y = pair64
    t = nasty_loss(zn, zo, y, tau=TAU, omega=0.3)
    a, b, yy = zn.numpy(), zo.numpy(), y.numpy()
    assert abs(t["ce"].item() - _ce_ref(a, yy)) < 1e-6
    ref = -0.3 * TAU ** 2 * _batch_kl(_soft, _soft, a, b, yy, TAU)  # KL(nasty || original)
    assert abs(t["nasty"].item() - ref) < 1e-6


def test_rml_plus_nasty_on_hand_made_logits():
    """RMLNasty (METHOD.md section 9) = RML's terms (CE, binary, reversed) and Nasty's -omega tau^2 KL(p(z) ||
    p(z_o)), against the references above on two rows whose reversal is worked by hand."""
    alpha, beta, omega = 0.5, 0.3, 0.04
    z = torch.tensor([[2.0, 0.5, -1.0, 1.0], [0.0, 1.0, 3.0, -0.5]], dtype=torch.float64)
    z_o = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.5, -1.0, 4.0, 1.5]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    # the original's non-target order reversed: row 0 (target 0) 2 > 1 > 0 at classes 3, 1, 2 -> 0, 1, 2;
    # row 1 (target 2) 1.5 > 0.5 > -1 at classes 3, 0, 1 -> -1, 0.5, 1.5
    r = np.array([[3.0, 1.0, 2.0, 0.0], [0.5, 1.5, 4.0, -1.0]])
    a, b, yy = z.numpy(), z_o.numpy(), y.numpy()
    expected = {"ce": _ce_ref(a, yy),
                "binary": alpha * TAU ** 2 * _batch_kl(_binary_ref, _binary_ref, b, a, yy, TAU),
                "reversed": beta * TAU ** 2 * _batch_kl(_non_target_ref, _non_target_ref, r, a, yy, TAU),
                "maximize": 0.0,
                "nasty": -omega * TAU ** 2 * _batch_kl(_soft, _soft, a, b, yy, TAU)}
    cfg = dict(RMLNasty.keys, tau=TAU, alpha=alpha, beta=beta, omega=omega)
    terms = RMLNasty(cfg).loss(z, z_o, y, progress=1.0)
    assert set(terms) == set(expected)
    for k, v in expected.items():
        assert abs(float(terms[k]) - v) < 1e-6, (k, float(terms[k]), v)
    assert expected["nasty"] < 0 and expected["reversed"] > 0
    # omega 0: RML's loss; alpha = beta = 0: Nasty's
    rml = RML(dict(RML.keys, tau=TAU, alpha=alpha, beta=beta)).loss(z, z_o, y, 1.0)
    no_omega = RMLNasty(dict(cfg, omega=0.0)).loss(z, z_o, y, 1.0)
    assert float(no_omega.pop("nasty")) == 0.0 and all(float(no_omega[k]) == float(rml[k]) for k in rml)
    nasty = Nasty(dict(Nasty.keys, tau=TAU, omega=omega)).loss(z, z_o, y, 1.0)
    only_nasty = RMLNasty(dict(cfg, alpha=0.0, beta=0.0)).loss(z, z_o, y, 1.0)
    assert abs(float(sum(only_nasty.values())) - float(sum(nasty.values()))) < 1e-12


def test_kd_matches_reference(pair64):
    zs, zt, y = pair64
    t = kd_loss(zs, zt, y, tau=TAU, alpha=0.9)
    a, b, yy = zs.numpy(), zt.numpy(), y.numpy()
    assert abs(t["ce"].item() - 0.1 * _ce_ref(a, yy)) < 1e-6
    assert abs(t["kd"].item() - 0.9 * TAU ** 2 * _batch_kl(_soft, _soft, b, a, yy, TAU)) < 1e-6
    free = kd_loss(zs, zt, None, tau=TAU, alpha=0.9)
    assert free["ce"].item() == 0.0 and torch.equal(free["kd"], t["kd"])


def test_dkd_matches_reference(pair64):
    zs, zt, y = pair64
    t = dkd_loss(zs, zt, y, tau=TAU, alpha=1.5, beta=8.0, warmup=0.5)
    a, b, yy = zs.numpy(), zt.numpy(), y.numpy()
    ref = {
        "ce": _ce_ref(a, yy),
        "tckd": 0.5 * 1.5 * TAU ** 2 * _batch_kl(_binary_ref, _binary_ref, b, a, yy, TAU),
        "nckd": 0.5 * 8.0 * TAU ** 2 * _batch_kl(_non_target_ref, _non_target_ref, b, a, yy, TAU),
    }
    for k, v in ref.items():
        assert abs(t[k].item() - v) < 1e-6, (k, t[k].item(), v)


def test_dfad_matches_reference(pair64):
    zs, zt, _ = pair64
    assert abs(dfad_discrepancy(zs, zt).item() - np.abs(zt.numpy() - zs.numpy()).mean()) < 1e-12


def test_float32_inputs_agree_with_float64(pair64):
    zs, zo, y = pair64
    for fn in (lambda a, b: rml_loss(a, b, y, TAU, 1.0, 1.0, 0.5), lambda a, b: nasty_loss(a, b, y, TAU),
               lambda a, b: kd_loss(a, b, y, TAU), lambda a, b: dkd_loss(a, b, y, TAU)):
        t32, t64 = fn(zs.float(), zo.float()), fn(zs, zo)
        for k in t64:
            assert t32[k].dtype == torch.float32
            assert abs(t32[k].item() - t64[k].item()) < 1e-4 * max(1.0, abs(t64[k].item())), k


# ------------------------------------------------------------------------------------------- gradcheck
LOSSES = {
    "rml": lambda s, o, y: rml_loss(s, o, y, tau=2.0, alpha=1.0, beta=1.0, gamma=0.5),
    "rml_all": lambda s, o, y: rml_loss(s, o, y, tau=2.0, alpha=0.5, beta=1.0, scope="all"),
    "nasty": lambda s, o, y: nasty_loss(s, o, y, tau=2.0, omega=0.5),
    "kd": lambda s, o, y: kd_loss(s, o, y, tau=2.0, alpha=0.9),
    "dkd": lambda s, o, y: dkd_loss(s, o, y, tau=2.0, alpha=1.0, beta=8.0),
    "dfad": lambda s, o, y: {"d": dfad_discrepancy(s, o)},
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name):
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    zo = torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    assert torch.autograd.gradcheck(lambda s: _sum(LOSSES[name](s, zo, y)), (zs,))


def test_original_receives_no_gradient():
    zs, y = _batch(4, 6, seed=2)
    zo = torch.randn(4, 6, requires_grad=True)
    zs.requires_grad_()
    _sum(rml_loss(zs, zo, y, gamma=0.5)).backward()
    _sum(nasty_loss(zs, zo, y)).backward()
    assert zo.grad is None and zs.grad is not None


# -------------------------------------------------------------------------------- ablation identities
def test_rml_with_zero_weights_is_cross_entropy():
    z, y = _batch(32, 10, seed=4)
    zo, _ = _batch(32, 10, seed=5)
    t = rml_loss(z, zo, y, alpha=0.0, beta=0.0, gamma=0.0)
    assert set(t) == {"ce", "binary", "reversed", "maximize"}
    assert all(t[k].item() == 0.0 for k in ("binary", "reversed", "maximize"))
    assert torch.equal(_sum(t), F.cross_entropy(z, y))


def test_nasty_with_zero_omega_is_cross_entropy():
    z, y = _batch(32, 10, seed=4)
    zo, _ = _batch(32, 10, seed=5)
    assert torch.equal(_sum(nasty_loss(z, zo, y, omega=0.0)), F.cross_entropy(z, y))


def test_dkd_without_nckd_is_ce_plus_binary_term(pair64):
    zs, zt, y = pair64
    t = dkd_loss(zs, zt, y, tau=TAU, alpha=2.0, beta=0.0)
    a, b, yy = zs.numpy(), zt.numpy(), y.numpy()
    ref = _ce_ref(a, yy) + 2.0 * TAU ** 2 * _batch_kl(_binary_ref, _binary_ref, b, a, yy, TAU)
    assert t["nckd"].item() == 0.0
    assert abs(_sum(t).item() - ref) < 1e-6


def test_rml_is_zero_at_its_target():
    """A teacher that outputs exactly reverse(z^o) has zero binary and reversed terms."""
    zo, y = _batch(32, 10, seed=6, dtype=torch.float64)
    t = rml_loss(reverse_logits(zo, y), zo, y)
    assert abs(t["binary"].item()) < 1e-12 and abs(t["reversed"].item()) < 1e-12


def test_re_reversal_recovers_original_teacher():
    zo, y = _batch(64, 100, seed=8)
    assert torch.equal(reverse_logits(reverse_logits(zo, y), y), zo)
    # a thief re-reversing by the teacher's own argmax gets back the original when the target is the argmax
    zo[torch.arange(64), y] = zo.max(1).values + 1
    r = reverse_logits(zo, y)
    assert torch.equal(reverse_logits(r, r.argmax(1)), zo)


# ---------------------------------------------------------------------------------------- autocast, misc
def test_bf16_autocast_gives_finite_float32():
    g = torch.Generator().manual_seed(9)
    head = torch.nn.Linear(16, 10)
    x = torch.randn(32, 16, generator=g) * 5
    y = torch.randint(0, 10, (32,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zs = head(x)
        with torch.no_grad():
            zo = head(x * 0.5)
        assert zs.dtype == torch.bfloat16
        all_terms = [rml_loss(zs, zo, y, tau=4.0, gamma=0.5), rml_loss(zs, zo, y, tau=20.0, scope="all"),
                     nasty_loss(zs, zo, y), kd_loss(zs, zo, y), kd_loss(zs, zo, None), dkd_loss(zs, zo, y),
                     {"d": dfad_discrepancy(zs, zo)}]
    for terms in all_terms:
        for k, v in terms.items():
            assert v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v), k
    _sum(all_terms[0]).backward()
    assert torch.isfinite(head.weight.grad).all()


def test_losses_reject_bad_shapes():
    z, y = _batch(4, 5, seed=0)
    with pytest.raises(ValueError, match="same shape"):
        rml_loss(z, z[:, :4], y)
    with pytest.raises(ValueError, match="2-D"):
        kd_loss(z[0], z[0], y)
    with pytest.raises(ValueError, match="target"):
        dkd_loss(z, z, y[:2])
    with pytest.raises(ValueError, match="scope"):
        rml_loss(z, z, y, beta=0.0, scope="bad")
    with pytest.raises(ValueError, match="tau"):
        nasty_loss(z, z, y, tau=0.0)
