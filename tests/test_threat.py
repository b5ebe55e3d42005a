"""The thief's threat model (METHOD.md section 9): how many training images it holds (a class-balanced draw
fixed by a seed), whether it has their labels, or transfer images of another dataset."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import fakedata
import train_dfad
import train_kd
import train_possessive
import train_scratch
from conftest import TINY, file_bytes, make_exp, read_json, run_main
from utils.checkpoint import load_checkpoint
from utils.data import class_balanced_subset, indices_digest


# ------------------------------------------------------------------------------------------ the subset
def test_subset_is_class_balanced_fixed_by_its_seed_and_nested():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=torch.Generator().manual_seed(1))]
    a = class_balanced_subset(labels, 50, 10, seed=3)
    assert torch.equal(a, class_balanced_subset(labels, 50, 10, seed=3))  # fixed by its seed
    assert torch.bincount(labels[a], minlength=10).tolist() == [5] * 10  # balanced
    assert len(set(a.tolist())) == 50 and torch.equal(a, a.sort().values)
    b = class_balanced_subset(labels, 50, 10, seed=4)
    assert not torch.equal(a, b)  # another seed, another draw
    small = class_balanced_subset(labels, 20, 10, seed=3)
    assert set(small.tolist()) <= set(a.tolist())  # a smaller subset of one seed lies inside the larger one
    assert indices_digest(a) == indices_digest(a.clone()) != indices_digest(b)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cifar_root):
    d = make_exp(tmp_path_factory.mktemp("threat_teacher") / "teacher", **dict(TINY, data_root=cifar_root))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, "weights.pth")


def test_every_arm_of_a_seed_holds_the_same_images(tmp_path, cifar_root, teacher):
    """Scratch, label smoothing and KD with one subset_seed train on one set of images; metrics.json says which."""
    common = dict(TINY, data_root=cifar_root, epochs=1, subset=40, subset_seed=2)
    ls = make_exp(tmp_path / "ls", **dict(common, label_smoothing=0.1))
    kd = make_exp(tmp_path / "kd", **dict(common, teacher=teacher))
    other = make_exp(tmp_path / "kd_other", **dict(common, teacher=teacher, subset_seed=3))
    assert run_main(train_scratch.main, ["--save_path", ls]) == 0
    assert run_main(train_kd.main, ["--save_path", kd]) == 0
    assert run_main(train_kd.main, ["--save_path", other]) == 0
    t_ls, t_kd, t_other = (read_json(os.path.join(d, "metrics.json"))["thief"] for d in (ls, kd, other))
    assert t_ls == t_kd and t_ls["images"] == 40 and t_ls["subset_seed"] == 2 and t_ls["labels"] is True
    assert t_ls["source"] == "cifar10" and t_other["indices_sha256"] != t_ls["indices_sha256"]
    from utils.data import load_split
    _, labels = load_split("cifar10", cifar_root, True)
    assert t_kd["indices_sha256"] == indices_digest(class_balanced_subset(labels, 40, 10, 2))


# ------------------------------------------------------------------------------------------ no labels
def _poisoned_copy(root, dest):
    """The same training images with every label replaced at random (the test split untouched)."""
    shutil.copytree(root, dest)
    folder = os.path.join(dest, "cifar-10-batches-py")
    rng = np.random.default_rng(7)
    for i in range(1, 6):
        path = os.path.join(folder, f"data_batch_{i}")
        with open(path, "rb") as f:
            d = pickle.load(f)
        d["labels"] = rng.integers(0, 10, size=len(d["labels"])).tolist()
        with open(path, "wb") as f:
            pickle.dump(d, f)
    return dest


@pytest.mark.parametrize("attack", ["vanilla", "dkd", "markov"])
def test_a_label_free_thief_never_reads_a_label(tmp_path, cifar_root, teacher, attack):
    """Poisoned training labels give the very same student: no loss term read them (the teacher's argmax
    takes the label's place), while the labelled thief's student changes."""
    poisoned = _poisoned_copy(cifar_root, str(tmp_path / "poisoned"))
    weights = {}
    for labels in (False, True):
        for name, root in (("clean", cifar_root), ("poisoned", poisoned)):
            d = make_exp(tmp_path / f"{name}_{labels}", **dict(TINY, data_root=root, teacher=teacher, epochs=1,
                                                               attack=attack, labels=labels))
            assert run_main(train_kd.main, ["--save_path", d]) == 0
            weights[name, labels] = load_checkpoint(os.path.join(d, "weights.pth"))["model"]
            assert read_json(os.path.join(d, "metrics.json"))["thief"]["labels"] is labels
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(weights["clean", False], weights["poisoned", False])
    assert not same(weights["clean", True], weights["poisoned", True])


def test_a_hard_label_thief_trains_the_same_student_with_or_without_labels(tmp_path, cifar_root, teacher):
    """hardlabel reads the teacher's argmax alone, so the label-free floor (the bar without labels) is the labelled
    threat model's hardlabel student, bit for bit; only the run's record of the thief differs."""
    runs = {}
    for labels in (True, False):
        d = make_exp(tmp_path / f"hardlabel_{labels}", **dict(TINY, data_root=cifar_root, teacher=teacher, epochs=2,
                                                                attack="hardlabel", subset=40, labels=labels))
        assert run_main(train_kd.main, ["--save_path", d]) == 0
        runs[labels] = read_json(os.path.join(d, "metrics.json"))
    assert runs[True]["weights_sha256"] == runs[False]["weights_sha256"]
    assert runs[True]["final_acc"] == runs[False]["final_acc"]
    assert (runs[True]["thief"]["labels"], runs[False]["thief"]["labels"]) == (True, False)


def test_transfer_images_train_a_label_free_thief(tmp_path, cifar_root, teacher):
    fakedata.make_cifar100(cifar_root_copy := str(tmp_path / "data"), train_per_class=2)
    shutil.copytree(os.path.join(cifar_root, "cifar-10-batches-py"),
                    os.path.join(cifar_root_copy, "cifar-10-batches-py"))
    d = make_exp(tmp_path / "transfer", **dict(TINY, data_root=cifar_root_copy, teacher=teacher, epochs=1,
                                               transfer="cifar100", labels=False, subset=100))
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["thief"]["source"] == "cifar100" and m["thief"]["images"] == 100 and m["thief"]["labels"] is False
    assert m["dataset"] == "cifar10" and m["final_acc"] is not None  # scored on the teacher's own test split


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("script,over,message", [
    ("kd", {"subset": 1000}, "subset 1000 needs 100 images of class 0"),
    ("kd", {"subset": 5}, "subset 5 is smaller than the number of classes"),
    ("kd", {"transfer": "cifar100", "labels": True}, "has no labels"),
    ("kd", {"transfer": "tinyimagenet", "labels": False}, "64 px"),
    ("kd", {"transfer": "svhn2", "labels": False}, "'transfer' must be empty or one of"),
    ("scratch", {"labels": False}, "trains on the true labels"),
    ("scratch", {"transfer": "cifar100", "labels": False}, "trains on the true labels"),
    ("possessive", {"labels": False}, "trains on the true labels"),
    ("dfad", {"transfer": "cifar100", "labels": False}, "'transfer' does not apply"),
])
def test_a_threat_model_that_makes_no_sense_is_one_line(tmp_path, cifar_root, teacher, capsys, script, over, message):
    main = {"kd": train_kd.main, "scratch": train_scratch.main, "possessive": train_possessive.main,
            "dfad": train_dfad.main}[script]
    params = dict(TINY, data_root=cifar_root, epochs=1, **over)
    if script in ("kd", "dfad"):
        params["teacher"] = teacher
    if script == "possessive":
        params["original"] = teacher
    d = make_exp(tmp_path / "bad", **params)
    before = file_bytes(d)
    capsys.readouterr()
    assert run_main(main, ["--save_path", d]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert file_bytes(d) == before


def test_scoring_every_few_epochs_trains_the_same_model(tmp_path, cifar_root, teacher):
    """eval_every changes what is logged, not what is trained: the same final weights and final accuracy."""
    out = {}
    for every in (1, 2):
        d = make_exp(tmp_path / f"every{every}", **dict(TINY, data_root=cifar_root, teacher=teacher, epochs=3,
                                                        eval_every=every))
        assert run_main(train_kd.main, ["--save_path", d]) == 0
        out[every] = (load_checkpoint(os.path.join(d, "weights.pth"))["model"],
                      read_json(os.path.join(d, "metrics.json")))
    (w1, m1), (w2, m2) = out[1], out[2]
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and m1["final_acc"] == m2["final_acc"]
    assert [("test_acc" in r) for r in m2["history"]] == [False, True, True]  # epochs 2 and 3 (the last)
