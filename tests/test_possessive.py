"""train_possessive.py end to end on tiny data: RML and Nasty, diagnostics, the frozen original, bad input."""
import os

import pytest
import torch

import models
import train_possessive
import train_scratch
from conftest import TINY, make_exp, read_json, run_main
from utils.checkpoint import model_record, save_checkpoint


@pytest.fixture(scope="module")
def original(tmp_path_factory, cifar_root):
    d = make_exp(tmp_path_factory.mktemp("orig") / "original", **dict(TINY, data_root=cifar_root, epochs=3))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, "last.pth")


def _exp(tmp_path, cifar_root, original, name="pt", **over):
    params = dict(TINY, data_root=cifar_root, original=original)
    params.update(over)
    return make_exp(tmp_path / name, **params)


@pytest.mark.device
@pytest.mark.parametrize("method", ["rml", "nasty", "rmlnasty"])
def test_end_to_end_writes_checkpoint_and_diagnostics(tmp_path, cifar_root, original, method):
    before = torch.load(original, weights_only=True)["model"]
    d = _exp(tmp_path, cifar_root, original, method=method, gamma=0.1, beta_warmup=1.0)
    assert run_main(train_possessive.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["method"] == method and m["original_acc"] > 10 and 0 <= m["final_ece"] <= 1
    response = torch.tensor(m["class_response"])
    assert response.shape == (10, 10) and torch.allclose(response.sum(1), torch.ones(10), atol=1e-4)
    assert torch.tensor(m["original_class_response"]).shape == (10, 10)
    diag = m["final_diagnostics"]
    for key in ("kl_to_original", "kendall", "reversed_top1", "nt_entropy", "original_nt_entropy"):
        assert key in diag and diag[key] == diag[key], key  # present and not NaN
    assert -1.0 <= diag["kendall"] <= 1.0 and 0.0 <= diag["reversed_top1"] <= 1.0
    terms = {"rml": ("train_ce", "train_binary", "train_reversed", "train_maximize"),
             "nasty": ("train_ce", "train_nasty"),
             "rmlnasty": ("train_ce", "train_binary", "train_reversed", "train_maximize", "train_nasty")}[method]
    assert all(t in m["history"][-1] for t in terms)
    ckpt = torch.load(os.path.join(d, "last.pth"), weights_only=True)
    assert ckpt["arch"] == TINY["model"] and ckpt["config"]["method"] == method
    after = torch.load(original, weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original file is untouched


def test_rml_reversal_takes_hold_when_fine_tuned(tmp_path, cifar_root, original):
    """Starting from the original, a few epochs of the reversed term alone pull Kendall's tau below zero."""
    d = _exp(tmp_path, cifar_root, original, init_from_original=True, alpha=0.0, beta=4.0, epochs=4, lr=0.02)
    assert run_main(train_possessive.main, ["--save_path", d]) == 0
    diag = read_json(os.path.join(d, "metrics.json"))["final_diagnostics"]
    assert diag["kendall"] < 0, diag


def test_step_never_updates_the_original():
    original = models.build("cnn_small", 10).eval().requires_grad_(False)
    snapshot = {k: v.clone() for k, v in original.state_dict().items()}
    cfg = dict(train_possessive.DEFAULTS, model="cnn_small")
    task = train_possessive.PossessiveTask(models.build("cnn_small", 10), original, cfg)
    task.train_model = task.model
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    terms, logits, _ = task.loss((x, y))
    sum(terms.values()).backward()
    assert all(p.grad is None for p in original.parameters())
    assert all(p.grad is not None for p in task.model.parameters())
    assert all(torch.equal(snapshot[k], v) for k, v in original.state_dict().items())


def test_bad_original_checkpoints(tmp_path, cifar_root, original, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    wrong = tmp_path / "c100.pth"
    save_checkpoint(str(wrong), model_record(models.build("cnn_small", 100), "cnn_small", "cifar100"))
    cases = [
        ({"original": str(tmp_path / "missing.pth")}, "not found"),
        ({"original": str(garbage)}, "cannot be read"),
        ({"original": str(wrong)}, "trained on cifar100"),
        ({"method": "evil"}, "'method' must be one of"),
        ({"init_from_original": True, "model": "resnet8"}, "init_from_original needs model"),
        ({"tau": -1.0}, "'tau' must be > 0"),
    ]
    for i, (over, message) in enumerate(cases):
        over = dict({"original": original}, **over)
        d = make_exp(tmp_path / f"bad{i}", **dict(TINY, data_root=cifar_root, **over))
        assert run_main(train_possessive.main, ["--save_path", d]) == 2, over
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (over, err)
        assert os.listdir(d) == ["params.json"]
