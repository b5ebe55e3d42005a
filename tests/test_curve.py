"""report.py --curve: final accuracy against epochs per arm, the preset's own points joined by config, and the
rule that picks the schedule (doubling the epochs gains < 1 point)."""
import json
import os

import report
from conftest import read_json, run_main

BASE = {"model": "cnn", "lr": 0.05, "batch_size": 128, "schedule": "onecycle", "dataset": "cifar10",
        "label_smoothing": 0.0}


TEACHER_ACC = {"teacher_resnet20": 87.76, "nasty_resnet20": 87.60}


def _run(folder, name, epochs, acc, seed=0, sha="abc", teacher="teacher_resnet20", **cfg):
    os.makedirs(os.path.join(folder, name))
    kd = "attack" in cfg
    m = {"script": "train_kd.py" if kd else "train_scratch.py", "model": "cnn", "epochs": epochs, "seed": seed,
         "final_acc": acc, "config": dict(BASE, epochs=epochs, seed=seed, **cfg)}
    if kd:
        m.update(attack=cfg["attack"], teacher_acc=TEACHER_ACC[teacher],
                 inputs={"teacher": {"path": f"exps/mini/{teacher}/weights.pth", "weights_sha256": sha}})
    with open(os.path.join(folder, name, "metrics.json"), "w") as f:
        json.dump(m, f)


def test_curve_joins_points_and_applies_the_rule(tmp_path, capsys):
    curve, preset = str(tmp_path / "curve"), str(tmp_path / "mini")
    for e, acc in ((6, 70.0), (12, 70.6)):
        _run(curve, f"scratch_e{e}", e, acc)
    for e, acc in ((6, 72.0), (12, 74.5)):
        _run(curve, f"kd_e{e}", e, acc, attack="vanilla", tau=4.0, markov_rank=3)
    for seed, acc in ((0, 65.0), (1, 66.0)):  # the preset's 3-epoch points of both arms, two seeds
        _run(preset, f"scratch_s{seed}", 3, acc, seed=seed)
        # seed 0 ran before the script had markov_rank: it still joins its arm
        extra = {} if seed == 0 else {"markov_rank": 3}
        _run(preset, f"kd_s{seed}", 3, acc + 4, seed=seed, attack="vanilla", tau=4.0, **extra)
    _run(preset, "ls", 3, 65.2, label_smoothing=0.1)  # another arm: not on the curve
    _run(preset, "lr", 3, 60.0, lr=0.1)  # same arm name, another setting: not on the curve
    assert run_main(report.main, [curve, "--curve", "--with", preset]) == 0
    out = read_json(os.path.join(curve, "curve.json"))
    arms = {a["label"]: a for a in out["arms"]}
    assert set(arms) == {"scratch (cnn)", "vanilla KD from teacher_resnet20 (cnn)"}
    scratch = arms["scratch (cnn)"]
    assert scratch["epochs"] == [3, 6, 12] and scratch["mean"] == [65.5, 70.0, 70.6] and scratch["enough_at"] == 6
    kd = arms["vanilla KD from teacher_resnet20 (cnn)"]
    assert kd["enough_at"] is None and kd["mean"][0] == 69.5  # +2.5 from 6 to 12; both seeds at 3 epochs
    text = open(os.path.join(curve, "curve.md")).read()
    assert "| scratch (cnn) | 3 | 65.50 ± 0.71 (2) | – |" in text and "long enough at 6 epochs" in text
    assert kd["doublings"] == [[3, 6, 2.5], [6, 12, 2.5]]
    assert "vanilla KD from teacher_resnet20 (cnn): not flat within the measured epochs (3, 6, 12): every doubling " \
           "measured gained ≥ 1 point (3→6 +2.50, 6→12 +2.50)." in text
    with open(os.path.join(curve, "fig_convergence.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_schedule_table_pairs_each_kd_arm_with_the_bar_at_its_own_schedule(tmp_path):
    long, preset = str(tmp_path / "long"), str(tmp_path / "mini")
    for seed, (bar, kd, other) in enumerate(((65.0, 68.0, 64.0), (65.5, 68.4, 64.1), (65.2, 68.1, 66.0))):
        _run(preset, f"ls_s{seed}", 3, bar, seed=seed, label_smoothing=0.1)
        _run(preset, f"kd_s{seed}", 3, kd, seed=seed, attack="tckd", tau=4.0)
        _run(preset, f"other_s{seed}", 3, other, seed=seed, sha="def", attack="tckd", tau=4.0)
    _run(preset, "scratch", 3, 65.1)  # one schedule, not in the long folder: no curve, no row
    _run(long, "ls_e24", 24, 80.0, label_smoothing=0.1)
    _run(long, "kd_e24", 24, 79.5, attack="tckd", tau=4.0)  # above the bar at 3 epochs, below at 24
    arms = {a["label"] for a in report.curve(long, [preset])["arms"]}
    assert arms == {"label smoothing (cnn)", "tckd KD from teacher_resnet20 (cnn)"}  # 'other' has one schedule
    (row,) = read_json(os.path.join(long, "curve.json"))["schedule"]
    short, full = row["rows"]
    assert (short["epochs"], short["n"], short["verdict"], short["n_paired"]) == (3, 3, "distillable", 3)
    assert short["p"] < 0.05 and abs(short["diff"] - 2.9333) < 1e-3
    assert (full["epochs"], full["n"], full["verdict"], full["p"]) == (24, 1, "KD-resistant", None)
    assert abs(full["diff"] + 0.5) < 1e-9 and row["verdicts"] == ["KD-resistant", "distillable"]
    text = open(os.path.join(long, "curve.md")).read()
    assert "| tckd KD from teacher_resnet20 (cnn) | 24 | 79.50 (1) | -0.50 | KD-resistant (n=1) |" in text
    assert ("crosses the bar between schedules (+2.93 at 3, -0.50 at 24); the verdict: distillable at 3, "
            "KD-resistant at 24." in text)
    with open(os.path.join(long, "fig_schedule.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_curve_of_an_empty_folder_is_one_line(tmp_path, capsys):
    assert run_main(report.main, [str(tmp_path), "--curve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no finished run" in err[0]


def test_a_battery_student_counts_its_share_of_the_battery_time():
    alone = {"wall_time_s": 300.0}
    member = {"wall_time_s": 600.0, "battery": ["a", "b", "c"]}
    assert report._total_seconds([alone]) == 300.0 and report._total_seconds([member]) == 200.0
    assert report._total_seconds([alone, member]) == 500.0 and report._total_seconds([{}]) is None


def test_schedule_frontier_takes_the_strongest_attack_per_teacher_and_schedule(tmp_path):
    long, preset = str(tmp_path / "long"), str(tmp_path / "mini")
    # bar 65/80; teacher "abc" (the original's folder): tckd strongest at 3, vanilla at 24, both above the bar at 3;
    # teacher "def" (another folder): below the bar with both attacks at 24, dkd only at 24 and 3
    for seed, bar in enumerate((65.0, 65.4, 65.2)):
        _run(preset, f"ls_s{seed}", 3, bar, seed=seed, label_smoothing=0.1)
        _run(preset, f"tckd_s{seed}", 3, bar + 3.0 + seed / 10, seed=seed, attack="tckd", tau=4.0)
        _run(preset, f"van_s{seed}", 3, bar + 2.0, seed=seed, attack="vanilla", tau=4.0)
        _run(preset, f"dkd_def_s{seed}", 3, bar - 1.0 - seed / 10, seed=seed, sha="def", teacher="nasty_resnet20",
             attack="dkd", tau=4.0)
    _run(long, "ls_e24", 24, 80.0, label_smoothing=0.1)
    _run(long, "tckd_e24", 24, 80.5, attack="tckd", tau=4.0)
    _run(long, "van_e24", 24, 81.0, attack="vanilla", tau=4.0)
    _run(long, "dkd_def_e24", 24, 79.0, sha="def", teacher="nasty_resnet20", attack="dkd", tau=4.0)
    _run(long, "van_def_e24", 24, 79.9, sha="def", teacher="nasty_resnet20", attack="vanilla", tau=4.0)  # one schedule
    out = report.curve(long, [preset])
    front = {(f["teacher"], f["epochs"]): f for f in out["frontier"]}
    assert set(front) == {("teacher_resnet20", 3), ("teacher_resnet20", 24), ("nasty_resnet20", 3),
                          ("nasty_resnet20", 24)}
    f = front[("teacher_resnet20", 3)]
    assert (f["strongest"], f["attacks"], f["n"], f["verdict"], f["resists_all"]) == (
        "tckd", ["tckd", "vanilla"], 3, "distillable", False)
    assert abs(f["diff"] - 3.1) < 1e-9 and f["p"] < 0.05 and f["teacher_acc"] == 87.76
    f = front[("teacher_resnet20", 24)]
    assert (f["strongest"], f["n"], f["verdict"], f["p"]) == ("vanilla", 1, "inconclusive", None)
    f = front[("nasty_resnet20", 24)]  # the vanilla run has no second schedule, so only dkd is compared
    assert (f["strongest"], f["attacks"], f["verdict"], f["resists_all"]) == ("dkd", ["dkd"], "KD-resistant", True)
    assert front[("nasty_resnet20", 3)]["harmful"]
    assert ([(f["teacher"], f["epochs"]) for f in out["frontier"]][:2]
            == [("teacher_resnet20", 3), ("teacher_resnet20", 24)])
    text = open(os.path.join(long, "curve.md")).read()
    assert ("| cnn | nasty_resnet20 (87.60) | 24 | 1: dkd | dkd | 79.00 (1) | -1.00 | KD-resistant (n=1) | yes |"
            in text)
    with open(os.path.join(long, "fig_frontier_schedule.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_each_data_size_is_its_own_arm_against_its_own_bar(tmp_path):
    """A thief's curve on 1,000 images and one on 5,000 are two arms, each KD point paired with the
    label-smoothing student that held the same images, and the labels say how many."""
    curve = str(tmp_path / "curve")
    for n, (ls, kd) in ((1000, (54.0, 62.0)), (5000, (72.0, 78.0))):
        for e in (60, 120):
            _run(curve, f"ls_n{n}_e{e}", e, ls, label_smoothing=0.1, subset=n, subset_seed=0)
            _run(curve, f"kd_n{n}_e{e}", e, kd, attack="vanilla", tau=4.0, subset=n, subset_seed=0)
    out = report.curve(curve)
    labels = {a["label"] for a in out["arms"]}
    assert ("label smoothing (cnn, 1,000 images)" in labels
            and "vanilla KD from teacher_resnet20 (cnn, 5,000 images)" in labels)
    diffs = {s["label"]: [r["diff"] for r in s["rows"]] for s in out["schedule"]}
    assert diffs["vanilla KD from teacher_resnet20 (cnn, 1,000 images)"] == [8.0, 8.0]
    assert diffs["vanilla KD from teacher_resnet20 (cnn, 5,000 images)"] == [6.0, 6.0]


def test_curve_says_when_no_doubling_was_measured(tmp_path):
    """3 and 24 epochs are not a doubling apart: the rule cannot say, and the report must not call the arm not flat."""
    curve = str(tmp_path / "curve")
    _run(curve, "ls_e3", 3, 65.0, label_smoothing=0.1)
    _run(curve, "ls_e24", 24, 81.0, label_smoothing=0.1)
    assert run_main(report.main, [curve, "--curve"]) == 0
    arm, = read_json(os.path.join(curve, "curve.json"))["arms"]
    assert arm["enough_at"] is None and arm["doublings"] == []
    text = open(os.path.join(curve, "curve.md")).read()
    assert "label smoothing (cnn): no doubling measured (epochs 3, 24): the rule cannot say" in text
    assert "not flat" not in text
