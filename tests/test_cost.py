"""The device-time projection (utils/cost.py) on hand-made epoch times, and reproduce.py --dry_run --cost."""
import json
import os

import pytest

import reproduce
from conftest import run_main
from reproduction.state import epoch_times_of
from utils.cost import check_epoch_times, load_epoch_times, project, runs_of
from utils.errors import UserError

# Chosen so every step's hours come out exact: 200 epochs x 18 s = 1 h, and so on.
EPOCH_TIMES = {
    "train_scratch.py/resnet18": 18,
    "train_scratch.py/cnn": {"seconds_per_epoch": 9, "batch_size": 128},
    "train_possessive.py/resnet18": {"seconds_per_epoch": 27.0},
    "train_kd.py/cnn": 4.5,
    # measured at 25 generator iterations per epoch: the paper's 50 take twice as long
    "train_dfad.py/resnet18": {"seconds_per_epoch": 9, "iters_per_epoch": 25, "k": 5, "batch_size": 256},
}


def _write(path, times):
    with open(path, "w") as f:
        json.dump({"device": "hand-made", "epoch_times": times}, f)
    return str(path)


def _step(name, script, model, epochs, **params):
    return {"name": name, "script": script, "params": dict(params, model=model, epochs=epochs, batch_size=128)}


def test_projection_hours_are_exact():
    steps = [_step("teacher", "train_scratch.py", "resnet18", 200),              # 200 x 18 s = 1 h
             _step("kd", "train_kd.py", "cnn", 200, tau_sweep=[1, 4, 10, 20]),  # 4 taus x 200 x 4.5 s = 1 h
             _step("dfad", "train_dfad.py", "resnet18", 500, iters_per_epoch=50, k=5),  # 500 x 9 s x 50/25 = 2.5 h
             _step("kd32", "train_kd.py", "resnet32", 200, tau=4.0)]
    steps[2]["params"]["batch_size"] = 256
    rows, total = project(steps, check_epoch_times(EPOCH_TIMES, "test"))
    assert [(r["runs"], r["hours"]) for r in rows] == [(1, 1.0), (4, 1.0), (1, 2.5), (1, None)]
    assert rows[2]["seconds_per_epoch"] == 18.0 and total == 4.5
    assert rows[3]["note"] == "no measured epoch time for train_kd.py/resnet32" and rows[3]["seconds_per_epoch"] is None


def test_paper_preset_projection():
    rows, total = project(reproduce.plan("paper", seeds=reproduce.PRESETS["paper"]["seeds"]),
                          check_epoch_times(EPOCH_TIMES, "test"))
    by_name = {r["step"]: r for r in rows}
    assert by_name["teacher_resnet18"]["hours"] == 1.0 and by_name["rml_resnet18"]["hours"] == 1.5
    assert by_name["kd_vanilla_rml_cnn"]["runs"] == 4 and by_name["kd_vanilla_rml_cnn"]["hours"] == 1.0
    assert by_name["dfad_rml_resnet18"]["hours"] == 2.5
    for r in rows:  # a step has hours exactly when its script/model was measured
        measured = f"{r['script']}/{r['model']}" in EPOCH_TIMES
        assert (r["hours"] is not None) == measured, r
        assert measured or r["note"] == f"no measured epoch time for {r['script']}/{r['model']}"
    assert total == pytest.approx(sum(r["hours"] for r in rows if r["hours"] is not None), abs=1e-9)


def test_mismatched_batch_or_k_gets_no_estimate():
    step = {"name": "dfad", "script": "train_dfad.py",
            "params": {"model": "resnet18", "epochs": 10, "batch_size": 256, "iters_per_epoch": 50, "k": 3}}
    rows, total = project([step], check_epoch_times(EPOCH_TIMES, "test"))
    assert rows[0]["hours"] is None and rows[0]["note"] == "measured with k 5, this step uses 3" and total == 0
    step = {"name": "s", "script": "train_scratch.py", "params": {"model": "cnn", "epochs": 10, "batch_size": 64}}
    rows, _ = project([step], check_epoch_times(EPOCH_TIMES, "test"))
    assert rows[0]["hours"] is None and rows[0]["note"] == "measured at batch 128, this step uses 64"


def test_runs_of_counts_distinct_taus():
    assert runs_of({"tau_sweep": [1, 4.0, 4, 10]}) == 3
    assert runs_of({"tau_sweep": []}) == 1 and runs_of({"tau": 4.0}) == 1


@pytest.mark.parametrize("content,message", [
    ("{", "is not valid JSON"),
    ("[]", "no 'epoch_times' object"),
    ('{"epoch_times": {"train_kd.py/cnn": -1}}', "'train_kd.py/cnn' needs a positive number"),
    ('{"epoch_times": {"train_kd.py/cnn": {"seconds": 3}}}', "'train_kd.py/cnn' needs a positive number"),
    ('{"epoch_times": {"cnn": 3}}', "key 'cnn' must read script/model"),
])
def test_bad_epoch_times_file(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_epoch_times(str(path))


def test_reproduce_dry_run_prints_the_projection(tmp_path, capsys):
    path = _write(tmp_path / "epoch_times.json", EPOCH_TIMES)
    argv = ["--preset", "paper", "--dry_run", "--cost", path, "--data_root", str(tmp_path),
            "--exp_root", str(tmp_path / "paper")]
    assert run_main(reproduce.main, argv) == 0
    out = capsys.readouterr().out
    assert "| teacher_resnet18 | train_scratch.py | resnet18 | 1 x 200 | 18.0 | 1.00 |" in out
    assert "| kd_vanilla_rml_cnn | train_kd.py | cnn | 4 x 200 | 4.5 | 1.00 |" in out
    assert "| dfad_rml_resnet18 | train_dfad.py | resnet18 | 1 x 500 | 18.0 | 2.50 |" in out
    assert "not counted: no measured epoch time for train_kd.py/resnet32" in out
    rows, total = project(reproduce.plan("paper", seeds=reproduce.PRESETS["paper"]["seeds"]),
                          check_epoch_times(EPOCH_TIMES, "test"))
    counted = sum(r["hours"] is not None for r in rows)
    assert f"Total: {total:.1f} device-hours for {counted} of {len(rows)} steps." in out
    assert f"{len(rows) - counted} steps have no usable measured time" in out
    # --only narrows the projection as it narrows the run
    assert run_main(reproduce.main, argv + ["--only", "teacher_"]) == 0
    assert "Total: 1.0 device-hours for 1 of 1 steps." in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--cost", "{path}"], "add --dry_run"),
    (["--dry_run", "--cost", "{missing}"], "not found"),
])
def test_reproduce_cost_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    path = _write(tmp_path / "epoch_times.json", EPOCH_TIMES)
    args = [a.format(path=path, missing=str(tmp_path / "missing.json")) for a in args]
    code = run_main(reproduce.main, ["--preset", "paper", "--data_root", str(tmp_path),
                                     "--exp_root", str(tmp_path / "paper")] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not os.path.exists(tmp_path / "paper")  # refused before anything was written


# ------------------------------------------------------------------------ epoch times from a folder's runs
def _run(root, name, script="train_kd.py", model="cnn", epochs=100, seconds=100.0, subset=1000, **extra):
    folder = root / name
    folder.mkdir()
    cfg = {"subset": subset, "batch_size": 128, **extra.pop("config", {})}
    metrics = {"script": script, "model": model, "epochs": epochs, "train_time_s": seconds, "config": cfg, **extra}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_a_folder_gives_the_median_epoch_time_of_its_finished_lone_runs(tmp_path):
    for i, seconds in enumerate((100.0, 300.0, 200.0)):  # 1, 3 and 2 s an epoch: the median is 2
        _run(tmp_path, f"kd{i}", seconds=seconds)
    _run(tmp_path, "in_a_battery", seconds=9000.0, battery={"size": 6})  # one clock for six students
    _run(tmp_path, "a_sweep", seconds=9000.0, config={"tau_sweep": [1, 4]})
    _run(tmp_path, "other_images", seconds=9000.0, subset=5000)  # fewer runs at 5,000 images than at 1,000
    _run(tmp_path, "ls", script="train_scratch.py", epochs=10, seconds=5.0)
    (tmp_path / "unfinished").mkdir()  # no metrics.json: not counted
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{")
    times = epoch_times_of(str(tmp_path))
    assert times["train_kd.py/cnn"] == {"seconds_per_epoch": 2.0, "subset": 1000, "measured_runs": 3, "batch_size": 128}
    assert times["train_scratch.py/cnn"]["seconds_per_epoch"] == 0.5 and set(times) == {"train_kd.py/cnn",
                                                                                          "train_scratch.py/cnn"}
    kd = {"name": "kd", "script": "train_kd.py", "params": {"model": "cnn", "epochs": 1800, "batch_size": 128,
                                                           "subset": 1000, "tau_sweep": [1, 4]}}
    other = dict(kd, name="p10", params=dict(kd["params"], subset=5000))
    full = dict(kd, name="full", params={k: v for k, v in kd["params"].items() if k != "subset"})
    rows, total = project([kd, other, full], times)
    assert rows[0]["hours"] == 2.0 and total == 2.0  # two taus x 1,800 epochs x 2 s
    assert rows[1]["note"] == "measured on 1,000 images, this step uses 5,000 images"
    assert rows[2]["note"] == "measured on 1,000 images, this step uses all the training images"


def test_a_folder_without_a_finished_lone_run_is_one_line(tmp_path, capsys):
    _run(tmp_path, "in_a_battery", battery={"size": 2})
    with pytest.raises(UserError, match="holds no finished lone run"):
        epoch_times_of(str(tmp_path))


def test_the_projection_counts_only_the_steps_not_done(threat_runs, cifar_root, capsys):
    """A finished grid projects nothing; another seed of it is projected from its finished lone runs (label
    smoothing and scratch), while its KD students, trained in batteries there, have no lone time to go by."""
    exp_root, roots, _ = threat_runs
    argv = ["--preset", "tiny", "--threat", "s50", "--data_root", cifar_root, "--exp_root", roots["s50"],
            "--teachers_from", exp_root, "--dry_run", "--cost", roots["s50"]]
    assert run_main(reproduce.main, argv) == 0
    out = capsys.readouterr().out
    assert "Projected device time of the 0 steps not done" in out and "Total: 0.0 device-hours for 0 of 0 steps." in out
    assert run_main(reproduce.main, argv + ["--seeds", "7"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "_seed7 |" in line]
    scratch = [r for r in rows if "train_scratch.py" in r]
    assert scratch and all(not r.endswith("|  |") and "not counted" not in r for r in scratch)
    assert all("not counted: no measured epoch time for train_kd.py/" in r for r in rows if "train_kd.py" in r)
    assert "Total: " in out and f"for {len(scratch)} of {len(rows)} steps." in out
