"""A thief runs any attack at the tau (and alpha) it picked on its own held-out images (train_kd.py tau_from): the
run takes the sweep's pick, records which sweep it came from, and is the very run that tau given by hand gives;
a sweep picked on the test split, another thief's images or another teacher are refused before anything is
written."""
import hashlib
import os

import pytest

import train_kd
import train_scratch
from conftest import TINY, make_exp, read_json, run_main
from reporting.cells import tau_cell
from reporting.collect import read_run


@pytest.fixture(scope="module")
def thief(tmp_path_factory, cifar_root):
    """A tiny teacher, a second one, and two finished vanilla sweeps against the first: one picked on 20 held-out
    images of the thief's own (over tau and alpha), one on the test split."""
    base = tmp_path_factory.mktemp("tau_from")
    out = {}
    for name, seed in (("teacher", 0), ("other", 1)):
        d = make_exp(base / name, **dict(TINY, data_root=cifar_root, seed=seed))
        assert run_main(train_scratch.main, ["--save_path", d]) == 0
        out[name] = os.path.join(d, "weights.pth")
    kd = dict(TINY, data_root=cifar_root, teacher=out["teacher"], epochs=1, subset=60)
    out["kd"] = kd
    out["val"] = make_exp(base / "sweep_val", **dict(kd, val_split=20, tau_sweep=[1, 8], alpha_sweep=[0.5, 0.9]))
    out["test"] = make_exp(base / "sweep_test", **dict(kd, tau_sweep=[1, 8]))
    for d in (out["val"], out["test"]):
        assert run_main(train_kd.main, ["--save_path", d]) == 0
    return out


def test_a_run_at_the_sweeps_pick_is_the_run_that_tau_by_hand_gives(thief, tmp_path):
    sweep = read_json(os.path.join(thief["val"], "sweep.json"))
    tuned = make_exp(tmp_path / "tuned", **dict(thief["kd"], val_split=20, attack="dkd", tau_from=thief["val"]))
    by_hand = make_exp(tmp_path / "by_hand", **dict(thief["kd"], val_split=20, attack="dkd", tau=sweep["best_tau"],
                                                     alpha=sweep["best_alpha"]))
    for d in (tuned, by_hand):
        assert run_main(train_kd.main, ["--save_path", d]) == 0
    a, b = read_json(os.path.join(tuned, "metrics.json")), read_json(os.path.join(by_hand, "metrics.json"))
    assert a["weights_sha256"] == b["weights_sha256"] and a["final_acc"] == b["final_acc"]
    assert a["config"]["tau"] == sweep["best_tau"] and a["config"]["alpha"] == sweep["best_alpha"]
    with open(os.path.join(thief["val"], "sweep.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert a["tau_from"] == {"path": thief["val"], "sweep_sha256": digest, "attack": "vanilla",
                             "tau": sweep["best_tau"], "alpha": sweep["best_alpha"], "val_images": 20,
                             "selected_by": "val_acc"}
    assert "tau_from" not in b
    run = read_run(str(tmp_path), "tuned")  # the report marks the tau as the thief's own pick
    assert tau_cell({"tau": run["tau"], "chosen": run["chosen"]}).endswith("(val 20)")
    assert "chosen" not in read_run(str(tmp_path), "by_hand")


def test_a_battery_runs_every_attack_at_the_thiefs_pick(thief, tmp_path):
    sweep = read_json(os.path.join(thief["val"], "sweep.json"))
    folders = [make_exp(tmp_path / a, **dict(thief["kd"], val_split=20, attack=a, tau_from=thief["val"]))
               for a in ("vanilla", "tckd")]
    assert run_main(train_kd.main, ["--battery", ",".join(folders)]) == 0
    for d in folders:
        m = read_json(os.path.join(d, "metrics.json"))
        assert m["tau"] == sweep["best_tau"] and m["tau_from"]["path"] == thief["val"] and m["battery"] == folders


@pytest.mark.parametrize("change,message", [
    ({"tau_from": "missing"}, "holds no finished sweep"),
    ({"tau_from": "test"}, "picked its tau on the test split"),
    ({"subset": 50}, "was made with subset=60, this run has subset=50"),
    ({"val_split": 10}, "was made with val_split=20, this run has val_split=10"),
    ({"teacher": "other"}, "tuned against teacher weights"),
    ({"tau_sweep": [1, 4]}, "keep one of them"),
])
def test_a_pick_that_is_not_this_thiefs_is_refused_before_anything_is_written(thief, tmp_path, capsys, change,
                                                                               message):
    cfg = dict(thief["kd"], val_split=20, tau_from=thief["val"])
    for key, value in change.items():
        cfg[key] = thief.get(value, str(tmp_path / value)) if key in ("tau_from", "teacher") else value
    d = make_exp(tmp_path / "bad", **cfg)
    before = sorted(os.listdir(d))
    assert run_main(train_kd.main, ["--save_path", d]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(os.listdir(d)) == before
