"""Checkpoints: atomic writes, safe loading (no code runs), and the checks against what a command expects."""
import os
import pickle

import pytest
import torch

import models
from utils.checkpoint import load_checkpoint, model_record, rebuild_model, save_checkpoint
from utils.errors import UserError


def test_roundtrip_rebuilds_architecture_from_checkpoint(tmp_path):
    model = models.build("resnet8", 10)
    path = str(tmp_path / "m.pth")
    save_checkpoint(path, model_record(model, "resnet8", "cifar10"))
    rebuilt, ckpt = rebuild_model(path, "teacher", dataset="cifar10", num_classes=10)
    assert ckpt["arch"] == "resnet8" and ckpt["mean"][0] == pytest.approx(0.4914)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # no temp file left behind


# the raw pickle below uses Python's default protocol on purpose (a crafted file need not look like torch's);
# torch warns that its weights-only loader expected protocol 2, which is beside the point here
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_checkpoint_never_runs_code(tmp_path):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(), "arch": "cnn"}, f)
    torch.save({"model": Payload(), "arch": "cnn"}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(UserError, match="refused|cannot be read"):
            load_checkpoint(str(p), "teacher")
    assert not marker.exists()


def test_mismatches_are_named(tmp_path):
    path = str(tmp_path / "c100.pth")
    save_checkpoint(path, model_record(models.build("cnn_small", 100), "cnn_small", "cifar100"))
    with pytest.raises(UserError, match="trained on cifar100"):
        rebuild_model(path, "teacher", dataset="cifar10")
    with pytest.raises(UserError, match="has 100 classes"):
        rebuild_model(path, "teacher", num_classes=10)
    record = model_record(models.build("cnn_small", 10), "resnet8", "cifar10")  # weights of another arch
    save_checkpoint(path, record)
    with pytest.raises(UserError, match="do not fit architecture 'resnet8'"):
        rebuild_model(path, "teacher")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    save_checkpoint(path, {"model": {}, "arch": "cnn", "epoch": 1})

    def boom(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(UserError, match="No space left"):
        save_checkpoint(path, {"model": {}, "arch": "cnn", "epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]
