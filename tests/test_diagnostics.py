"""Tests for utils/diagnostics.py: known values (reversal, uniform, perfect calibration) and loop references."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils.diagnostics as diagnostics
from utils.diagnostics import (expected_calibration_error, mean_kl, non_target_entropy, non_target_kendall,
                               reversed_top1_match)
from utils.losses import reverse_logits


def _distinct(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.stack([torch.randperm(c, generator=g) for _ in range(n)]).float() + torch.rand(n, 1, generator=g)
    return z, torch.randint(0, c, (n,), generator=g)


def _kendall_ref(a, b, y):
    """Loop reference: tau-a over the non-target pairs of each row, averaged."""
    taus = []
    for ra, rb, t in zip(a.tolist(), b.tolist(), y.tolist()):
        nt = [i for i in range(len(ra)) if i != t]
        s = sum(np.sign(ra[i] - ra[j]) * np.sign(rb[i] - rb[j]) for k, i in enumerate(nt) for j in nt[k + 1:])
        taus.append(s / (len(nt) * (len(nt) - 1) / 2))
    return float(np.mean(taus))


def _is_metric(v):
    return torch.is_tensor(v) and v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad


@pytest.mark.parametrize("c", [3, 10, 100])
def test_kendall_of_reversal_and_identity(c):
    z, y = _distinct(64, c, seed=c)
    tau = non_target_kendall(reverse_logits(z, y), z, y)
    assert _is_metric(tau)
    assert tau.item() == pytest.approx(-1.0, abs=1e-6)
    assert non_target_kendall(z, z, y).item() == pytest.approx(1.0, abs=1e-6)


def test_kendall_matches_loop_reference_with_ties(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (20, 8), generator=g).float()
    b = torch.randint(0, 4, (20, 8), generator=g).float()
    y = torch.randint(0, 8, (20,), generator=g)
    ref = _kendall_ref(a, b, y)
    assert non_target_kendall(a, b, y).item() == pytest.approx(ref, abs=1e-6)
    monkeypatch.setattr(diagnostics, "_KENDALL_MAX_ELEMENTS", 3 * 64)  # chunks of 3 samples
    assert non_target_kendall(a, b, y).item() == pytest.approx(ref, abs=1e-6)
    assert non_target_kendall(a, b, y, reduction="sum").item() == pytest.approx(20 * ref, abs=1e-5)


def test_kendall_ignores_the_target():
    z, y = _distinct(16, 10, seed=1)
    moved = z.clone()
    moved[torch.arange(16), y] = -100.0
    assert non_target_kendall(moved, z, y).item() == pytest.approx(1.0, abs=1e-6)


def test_kendall_needs_three_classes():
    z, y = _distinct(4, 2, seed=0)
    with pytest.raises(ValueError, match="C >= 3"):
        non_target_kendall(z, z, y)


def test_reversed_top1_match():
    z, y = _distinct(64, 10, seed=2)
    m = reversed_top1_match(reverse_logits(z, y), z, y)
    assert _is_metric(m) and m.item() == 1.0
    assert reversed_top1_match(z, z, y).item() == 0.0
    assert reversed_top1_match(reverse_logits(z, y), z, y, reduction="sum").item() == 64.0
    # target excluded on both sides: the possessive's target may be its argmax, the original's its argmin
    zp, zo = reverse_logits(z, y), z.clone()
    zp[torch.arange(64), y] = 1e4
    zo[torch.arange(64), y] = -1e4
    assert reversed_top1_match(zp, zo, y).item() == 1.0


@pytest.mark.parametrize("c", [3, 10, 100])
def test_non_target_entropy(c):
    y = torch.randint(0, c, (16,), generator=torch.Generator().manual_seed(c))
    z = torch.full((16, c), 2.0)
    z[torch.arange(16), y] = 9.0  # the target's value does not matter
    h = non_target_entropy(z, y, tau=4.0)
    assert _is_metric(h) and h.item() == pytest.approx(math.log(c - 1), abs=1e-5)
    zr, _ = _distinct(16, c, seed=c)
    assert non_target_entropy(zr, y, tau=1.0).item() < math.log(c - 1)


def test_mean_kl():
    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    assert mean_kl(p, p, tau=4.0).item() == pytest.approx(0.0, abs=1e-7)
    ref = F.kl_div(F.log_softmax(q / 2, 1), F.log_softmax(p / 2, 1), reduction="batchmean", log_target=True)
    kl = mean_kl(p, q, tau=2.0)
    assert _is_metric(kl) and kl.item() == pytest.approx(ref.item(), rel=1e-5)
    assert mean_kl(p, q, tau=2.0, reduction="sum").item() == pytest.approx(8 * ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        mean_kl(p, q, tau=2.0, reduction="none")


def _ece_ref(logits, target, n_bins):
    probs = F.softmax(logits.double(), 1)
    conf, pred = probs.max(1)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = [i for i in range(len(conf)) if lo < conf[i] <= hi]
        if inside:
            acc = np.mean([float(pred[i] == target[i]) for i in inside])
            ece += len(inside) / len(conf) * abs(acc - np.mean([conf[i].item() for i in inside]))
    return ece


def test_ece_known_values():
    y = torch.arange(10) % 5
    perfect = F.one_hot(y, 5).float() * 100.0
    e = expected_calibration_error(perfect, y)
    assert _is_metric(e) and e.item() == 0.0
    # confident and always wrong: ECE = confidence
    assert expected_calibration_error(perfect, (y + 1) % 5).item() == pytest.approx(1.0, abs=1e-6)
    # 2 classes, confidence sigmoid(log 3) = 0.75, right half the time: |0.5 - 0.75|
    z = torch.tensor([[math.log(3.0), 0.0]] * 4)
    assert expected_calibration_error(z, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(0.25, abs=1e-6)


def test_ece_matches_loop_reference():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(200, 10, generator=g) * 3
    y = torch.randint(0, 10, (200,), generator=g)
    for n_bins in (1, 10, 15):
        assert expected_calibration_error(z, y, n_bins).item() == pytest.approx(_ece_ref(z, y, n_bins), abs=1e-5)


def test_bf16_inputs_and_no_grad():
    z, y = _distinct(16, 10, seed=5)
    zb = z.to(torch.bfloat16).requires_grad_()
    for v in (non_target_kendall(zb, zb, y), reversed_top1_match(zb, zb, y), non_target_entropy(zb, y, 4.0),
              mean_kl(zb, zb, 4.0), expected_calibration_error(zb, y)):
        assert _is_metric(v) and torch.isfinite(v)
