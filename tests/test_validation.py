"""The thief's validation split (train_kd.py val_split): held out of its own training images by a draw fixed by
subset_seed, never trained on, never the test split; the tau (and alpha) sweep picks there when it is given."""
import hashlib
import json
import os
import shutil

import pytest
import torch

import reporting.cells as cells
import train_kd
import train_scratch
from conftest import TINY, make_exp, read_json, run_main
from utils.data import build_loaders, class_balanced_subset, indices_digest, load_split, validation_split
from utils.errors import UserError


def _hashes(images):
    return {hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest() for x in images}


def test_validation_split_is_fixed_by_its_seed_and_disjoint():
    keep, held = validation_split(40, 10, seed=2)
    assert len(held) == 10 and len(keep) == 30 and not set(keep.tolist()) & set(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(40))
    again_keep, again_held = validation_split(40, 10, seed=2)
    assert torch.equal(held, again_held) and torch.equal(keep, again_keep)
    assert not torch.equal(held, validation_split(40, 10, seed=3)[1])
    for size in (0, 40, 41):
        with pytest.raises(UserError, match="val_split"):
            validation_split(40, size, seed=0)


@pytest.mark.parametrize("subset", [0, 40])
def test_validation_images_are_the_thiefs_and_never_trained_on_nor_tested(cifar_root, subset):
    cfg = dict(train_kd.DEFAULTS, **TINY)
    cfg.update(data_root=cifar_root, device="cpu", subset=subset, subset_seed=1, val_split=10)
    loaders = build_loaders(cfg, "cpu")
    images, labels = load_split("cifar10", cifar_root, True)
    test_images, _ = load_split("cifar10", cifar_root, False)
    thief = class_balanced_subset(labels, subset, 10, 1) if subset else torch.arange(len(labels))
    keep, held = validation_split(len(thief), 10, 1)
    train, val = loaders["train"], loaders["val"]
    assert torch.equal(val.images, images[thief[held]]) and torch.equal(val.labels, labels[thief[held]])
    assert torch.equal(train.images, images[thief[keep]])  # the student learns from the rest of its images only
    assert len(_hashes(val.images)) == 10
    assert not _hashes(val.images) & _hashes(train.images)
    assert not _hashes(val.images) & _hashes(test_images)
    assert torch.equal(loaders["test"].images, test_images)  # the test split is untouched
    record = train.thief
    assert record["images"] == len(thief) - 10 and record["val_images"] == 10 and record["val_seed"] == 1
    assert record["indices_sha256"] == indices_digest(thief[keep])
    assert record["val_indices_sha256"] == indices_digest(thief[held])
    assert not val.train and len(list(val)) == 1  # scored in order, no augmentation


def test_no_validation_split_keeps_the_thief_record_as_it_was(cifar_root):
    cfg = dict(train_kd.DEFAULTS, **TINY)
    cfg.update(data_root=cifar_root, device="cpu")
    loaders = build_loaders(cfg, "cpu")
    assert "val" not in loaders
    assert set(loaders["train"].thief) == {"source", "images", "subset_seed", "indices_sha256", "labels"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cifar_root):
    d = make_exp(tmp_path_factory.mktemp("val_teacher") / "teacher", **dict(TINY, data_root=cifar_root))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, "weights.pth")


def test_sweep_picks_tau_and_alpha_on_the_validation_split(tmp_path, cifar_root, teacher, capsys):
    d = make_exp(tmp_path / "sweep", **dict(TINY, data_root=cifar_root, teacher=teacher, epochs=1, val_split=20,
                                             tau_sweep=[1, 4], alpha_sweep=[0.5, 0.9]))
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    s = read_json(os.path.join(d, "sweep.json"))
    names = ["1/0.5", "1/0.9", "4/0.5", "4/0.9"]
    assert list(s["runs"]) == names and s["runs"]["4/0.5"] == "tau_4_alpha_0.5"
    assert s["selected_on"] == "val" and s["val_images"] == 20 and "validation split" in s["protocol"]
    best = max(names, key=lambda n: s["val_acc"][n])  # picked on val, whatever the test split says
    assert s["best_run"] == best and s["best_acc"] == s["final_acc"][best]
    assert f"{s['best_tau']:g}/{s['best_alpha']:g}" == best
    for n in names:
        m = read_json(os.path.join(d, s["runs"][n], "metrics.json"))
        assert m["val_acc"] == s["val_acc"][n] and m["thief"]["val_images"] == 20 and m["thief"]["images"] == 80
        assert m["config"]["tau_sweep"] == [] and m["config"]["alpha_sweep"] == []
        assert f"{m['tau']:g}/{m['alpha']:g}" == n
    assert "(on the validation split, by val_acc)" in capsys.readouterr().out
    # the report names the pick and where it was made; an arm tuned on the test split reads as before
    from reporting.collect import read_run
    run = read_run(str(tmp_path), "sweep")
    assert run["tau"] == s["best_tau"] and run["acc"] == s["best_acc"]
    assert run["chosen"] == {"alpha": s["best_alpha"], "val_images": 20}
    arm = {"tau": run["tau"], "chosen": run["chosen"]}
    assert cells.tau_cell(arm) == f"{s['best_tau']:g}, α {s['best_alpha']:g} (val 20)"
    assert cells.chosen_note({"kd": {"nasty": {"vanilla": arm}}})
    assert cells.tau_cell({"tau": 4.0}) == "4"
    assert cells.chosen_note({"kd": {"nasty": {"vanilla": {"tau": 4.0}}}}) == []


def test_val_scores_are_top1_and_mean_cross_entropy_against_the_labels_the_thief_holds():
    from utils.thief import val_scores, val_sums
    torch.manual_seed(0)
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]  # two batches: the sums add up across them
    with torch.no_grad():
        for labels, target in ((True, y), (False, teacher(x).argmax(1))):
            got = val_scores(val_sums(student, loader, teacher, labels))
            assert got["val_acc"] == pytest.approx(100.0 * (student(x).argmax(1) == target).float().mean().item())
            assert got["val_nll"] == pytest.approx(torch.nn.functional.cross_entropy(student(x), target).item())
    assert val_sums(student, [], teacher, True).tolist() == [0.0, 0.0, 0.0]  # a DDP rank with no images adds 0


def test_a_sweep_picks_by_val_nll_reusing_its_runs_and_scoring_older_ones_from_their_weights(tmp_path, cifar_root,
                                                                                            teacher, capsys):
    base = dict(TINY, data_root=cifar_root, teacher=teacher, epochs=1, val_split=20, tau_sweep=[1, 4, 20])
    d = make_exp(tmp_path / "sweep", **dict(base, select_by="val_nll"))
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    s = read_json(os.path.join(d, "sweep.json"))
    assert s["selected_by"] == "val_nll" and "val_nll_from_weights" not in s
    assert s["runs"][f"{s['best_tau']:g}"] == f"tau_{s['best_tau']:g}"
    assert s["val_nll"][f"{s['best_tau']:g}"] == min(s["val_nll"].values())  # the lowest cross-entropy wins
    recorded = {}
    for n, sub in s["runs"].items():
        m = read_json(os.path.join(d, sub, "metrics.json"))
        assert m["val_nll"] == s["val_nll"][n] and m["val_acc"] == s["val_acc"][n]
        assert "select_by" not in m["config"]  # the sweep's, not its runs': either pick reuses them
        recorded[n] = m["val_nll"]
    assert "(on the validation split, by val_nll)" in capsys.readouterr().out
    from reporting.collect import read_run
    arm = {"tau": s["best_tau"], "chosen": read_run(str(tmp_path), "sweep")["chosen"]}
    assert cells.tau_cell(arm) == f"{s['best_tau']:g} (val 20, by cross-entropy)"
    assert "select_by val_nll" in cells.chosen_note({"kd": {"nasty": {"tuned": arm}}})[1]
    # the same runs picked by accuracy: nothing trained again
    with open(os.path.join(d, "params.json")) as f:
        params = f.read()
    with open(os.path.join(d, "params.json"), "w") as f:
        f.write(params.replace('"val_nll"', '"val_acc"'))
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    out = capsys.readouterr().out
    assert out.count("exists, skipped") == 3
    acc = read_json(os.path.join(d, "sweep.json"))
    assert acc["selected_by"] == "val_acc" and acc["val_acc"][f"{acc['best_tau']:g}"] == max(acc["val_acc"].values())
    # a run that finished before val_nll was recorded is scored from its weights; without them, one line
    older = os.path.join(d, "tau_4", "metrics.json")
    m = read_json(older)
    del m["val_nll"]
    with open(older, "w") as f:
        json.dump(m, f)
    with open(os.path.join(d, "params.json"), "w") as f:
        f.write(params)
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    again = read_json(os.path.join(d, "sweep.json"))
    assert again["val_nll_from_weights"] == ["4"] and again["val_nll"]["4"] == pytest.approx(recorded["4"], rel=1e-5)
    assert again["best_tau"] == s["best_tau"]
    # another run's weights in its place are refused, as are missing ones: one line each
    weights = os.path.join(d, "tau_4", "weights.pth")
    os.replace(weights, weights + ".kept")
    shutil.copy(os.path.join(d, "tau_1", "weights.pth"), weights)
    capsys.readouterr()
    assert run_main(train_kd.main, ["--save_path", d]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("error")]
    assert len(err) == 1 and "is not the weights file" in err[0] and "tau_4/metrics.json recorded" in err[0], err
    os.remove(weights)
    assert run_main(train_kd.main, ["--save_path", d]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("error")]
    assert len(err) == 1 and "records no val_nll" in err[0] and "--overwrite" in err[0], err


def test_a_sweep_picks_among_another_sweeps_runs_training_nothing(tmp_path, cifar_root, teacher, capsys):
    base = dict(TINY, data_root=cifar_root, teacher=teacher, epochs=1, val_split=20, tau_sweep=[1, 4])
    a = make_exp(tmp_path / "a", **base)
    assert run_main(train_kd.main, ["--save_path", a]) == 0
    capsys.readouterr()
    b = make_exp(tmp_path / "b", **dict(base, select_by="val_nll", runs_from=a))
    assert run_main(train_kd.main, ["--save_path", b, "--overwrite"]) == 0  # overwrite never retrains a's runs
    assert capsys.readouterr().out.count("exists, skipped") == 2
    assert sorted(os.listdir(b)) == ["config.json", "params.json", "sweep.json"]  # no run of its own
    sa, sb = read_json(os.path.join(a, "sweep.json")), read_json(os.path.join(b, "sweep.json"))
    assert sb["runs"] == {"1": os.path.join("..", "a", "tau_1"), "4": os.path.join("..", "a", "tau_4")}
    assert sb["val_nll"] == sa["val_nll"] and sb["final_acc"] == sa["final_acc"]
    assert sb["best_tau"] == float(min(sb["val_nll"], key=sb["val_nll"].get))
    for n, sub in sa["runs"].items():
        with open(os.path.join(a, sub, "metrics.json"), "rb") as f:
            assert sb["inputs"]["runs"][n] == hashlib.sha256(f.read()).hexdigest()
    from reporting.collect import read_run
    ra, rb = read_run(str(tmp_path), "a"), read_run(str(tmp_path), "b")
    assert rb["acc"] == sb["best_acc"] and rb["digests"] == ra["digests"]  # one set of runs: counted once
    assert rb["chosen"]["by"] == "val_nll" and "by" not in ra["chosen"]
    # runs_from without those runs, with another config, or naming the sweep's own folder: one line, nothing written
    for name, params, message in (
            ("c", dict(base, runs_from=str(tmp_path / "none")), "tau 1 is not a finished run of this sweep there"),
            ("d", dict(base, runs_from=a, epochs=2), "was made with epochs=1, this sweep has epochs=2"),
            ("e", dict(base, runs_from=str(tmp_path / "e")), "is this sweep's own folder")):
        d = make_exp(tmp_path / name, **params)
        assert run_main(train_kd.main, ["--save_path", d]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("error")]
        assert len(err) == 1 and message in err[0], err
        assert os.listdir(d) == ["params.json"]


def test_a_label_free_thief_validates_against_the_teachers_answers(tmp_path, cifar_root, teacher):
    d = make_exp(tmp_path / "nl", **dict(TINY, data_root=cifar_root, teacher=teacher, epochs=1, val_split=20,
                                          labels=False))
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert 0 <= m["val_acc"] <= 100 and m["thief"]["labels"] is False and m["thief"]["val_images"] == 20


@pytest.mark.parametrize("args,message", [
    (["--val_split", "-1"], "'val_split' must be >= 0"),
    (["--val_split", "100"], "val_split 100 must be below the thief's 100 training images"),
    (["--alpha_sweep", "0.5,2"], "'alpha_sweep' must be a list of KD weights in [0, 1]"),
    (["--select_by", "val_loss"], "'select_by' must be one of val_acc, val_nll"),
    (["--select_by", "val_nll", "--tau_sweep", "1,4"], "select_by val_nll picks among a sweep's runs"),
    (["--select_by", "val_nll", "--val_split", "20"], "select_by val_nll picks among a sweep's runs"),
    (["--runs_from", "exps/elsewhere"], "'runs_from' makes a sweep pick among another sweep's runs"),
])
def test_bad_validation_settings_are_one_line_exit_2(tmp_path, cifar_root, teacher, capsys, args, message):
    d = make_exp(tmp_path / "bad", **dict(TINY, data_root=cifar_root, teacher=teacher))
    assert run_main(train_kd.main, ["--save_path", d] + args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("error")]
    assert len(err) == 1 and message in err[0], err
