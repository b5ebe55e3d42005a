"""Tests for the model zoo in ``models``. Kept small: whole file runs in well under 30 s on CPU."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import models
from models import ALIASES, MODELS, build, count_parameters, describe, names

ALL_NAMES = names()
# The three biggest models (20M-36M params) get the full forward/backward check but
# are skipped in the secondary per-model checks to keep the file fast on a shared CPU.
HUGE = {"resnet34", "resnet50", "wrn28_10"}
NOT_HUGE = [n for n in ALL_NAMES if n not in HUGE]


@functools.lru_cache(maxsize=None)
def n_params(name: str, num_classes: int = 10) -> int:
    return count_parameters(build(name, num_classes))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: tiny batches gain nothing from more, and on a shared
    CPU extra OpenMP threads spin and slow everything down. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- registry


def test_names_sorted_and_match_registry() -> None:
    assert ALL_NAMES == sorted(MODELS)
    expected = {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4", "resnet18", "resnet34", "resnet50",
        "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "wrn28_10",
        "cnn", "cnn_small", "mobilenetv2", "shufflenetv2",
    }  # fmt: skip
    assert set(ALL_NAMES) == expected


def test_aliases_point_to_canonical_names() -> None:
    assert ALIASES == {
        "wrn_16_1": "wrn16_1",
        "wrn_16_2": "wrn16_2",
        "wrn_40_1": "wrn40_1",
        "wrn_40_2": "wrn40_2",
        "wrn_28_10": "wrn28_10",
        "ResNet18": "resnet18",
        "ResNet34": "resnet34",
        "ResNet50": "resnet50",
        "MobileNetV2": "mobilenetv2",
        "ShuffleV2": "shufflenetv2",
    }
    assert not set(ALIASES) & set(MODELS)


@pytest.mark.parametrize("alias", ["wrn_40_2", "wrn_16_2", "ShuffleV2", "ResNet18"])
def test_alias_builds_same_model(alias: str) -> None:
    a = build(alias, 10)
    b = build(ALIASES[alias], 10)
    assert type(a) is type(b)
    assert count_parameters(a) == count_parameters(b)


def test_unknown_name_raises_with_valid_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        build("resnet9000", 10)
    msg = str(excinfo.value)
    assert msg == f"unknown model 'resnet9000'; choose one of: {', '.join(names())}"
    for name in ALL_NAMES:
        assert name in msg


@pytest.mark.parametrize("bad", [0, 1, -3, 2.5, 10.0, True, "10", None])
def test_bad_num_classes_raises(bad: object) -> None:
    with pytest.raises(ValueError):
        build("resnet8", bad)  # type: ignore[arg-type]


def test_num_classes_accepts_numpy_style_integral() -> None:
    class Integral(int):  # e.g. numpy.int64 behaves like an Integral
        pass

    assert build("cnn_small", Integral(2))(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_count_parameters() -> None:
    assert count_parameters(nn.Linear(3, 4)) == 16


def test_describe_covers_every_model() -> None:
    rows = describe()
    assert [r[0] for r in rows] == ALL_NAMES
    for name, params, desc in rows:
        assert params == n_params(name)
        assert isinstance(params, int)
        assert isinstance(desc, str) and desc and "\n" not in desc


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_backward(name: str, device: torch.device) -> None:
    model = build(name, 10)
    assert type(model).__module__.startswith("models.")
    model.to(device).train()
    logits = model(torch.randn(2, 3, 32, 32, device=device))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has non-finite gradient"


@pytest.mark.parametrize("name", NOT_HUGE)
def test_forward_64x64_eval(name: str) -> None:
    model = build(name, 10).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NOT_HUGE)
def test_standard_init(name: str) -> None:
    model = MODELS[name](10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Conv2d):
            # kaiming_normal_(mode="fan_out") uses out_channels * kh * kw (groups ignored)
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            expected = math.sqrt(2.0 / fan_out)
            if m.weight.numel() >= 500:  # enough samples for a stable std estimate
                assert m.weight.std().item() == pytest.approx(expected, rel=0.2)


# ---------------------------------------------------------------- sizes

# Published sizes: ResNet-20 0.27M, ResNet-56 0.86M (He et al.; RepDistiller), resnet32x4
# 7.43M with 100 classes (RepDistiller; 7.41M with 10), WRN-40-2 2.2M, WRN-28-10 36.5M,
# ResNet-18 11.17M, ResNet-34 21.3M, ResNet-50 23.5M (pytorch-cifar), ShuffleNetV2 1.26M.
PARAM_RANGES = {
    "resnet20": (0.26e6, 0.29e6),
    "resnet56": (0.85e6, 0.87e6),
    "resnet32x4": (7.40e6, 7.45e6),
    "wrn40_2": (2.20e6, 2.25e6),
    "wrn28_10": (36.4e6, 36.6e6),
    "resnet18": (11.10e6, 11.25e6),
    "resnet34": (21.2e6, 21.4e6),
    "resnet50": (23.4e6, 23.6e6),
    "mobilenetv2": (2.2e6, 2.3e6),
    "shufflenetv2": (1.25e6, 1.27e6),
    "cnn": (0.08e6, 0.3e6),
}


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_parameter_count(name: str) -> None:
    lo, hi = PARAM_RANGES[name]
    n = n_params(name)
    assert lo <= n <= hi, f"{name}: {n} params not in [{lo:.0f}, {hi:.0f}]"


def test_resnet32x4_matches_repdistiller_with_100_classes() -> None:
    assert n_params("resnet32x4", 100) == pytest.approx(7.43e6, abs=0.005e6)


def test_model_sizes_are_ordered() -> None:
    depths = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    values = [n_params(n) for n in depths]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert n_params("cnn_small") < n_params("cnn")
    assert n_params("wrn16_1") < n_params("wrn16_2") < n_params("wrn40_2") < n_params("wrn28_10")
    assert n_params("resnet8") < n_params("resnet8x4") < n_params("resnet32x4")
    assert n_params("resnet18") < n_params("resnet34")


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("name", ["resnet20", "cnn", "wrn16_1", "shufflenetv2", "resnet18"])
def test_100_classes(name: str) -> None:
    model = build(name, 100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert fc.out_features == 100


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_64x64_train_backward(name: str) -> None:
    model = build(name, 10).train()
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 10)
    logits.sum().backward()


@pytest.mark.parametrize("name", ["resnet20", "cnn", "shufflenetv2", "wrn16_2"])
def test_channels_last_bf16_autocast(name: str, device: torch.device) -> None:
    model = build(name, 10).to(device, memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, 10) and logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet20", "shufflenetv2"])
def test_channels_last_matches_contiguous(name: str) -> None:
    model = build(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_models_package_exports() -> None:
    for attr in ("MODELS", "ALIASES", "names", "build", "count_parameters", "describe"):
        assert hasattr(models, attr)
