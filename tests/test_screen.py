"""screen.md: a screening schedule's tables, built from its run folders alone (reporting/screen.py)."""
import json
import os

import pytest

import report
from utils.errors import UserError


def _run(folder, **metrics):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)


def _teacher(folder, acc, kendall, **cfg):
    cfg = dict({"method": "rml", "alpha": 1.0, "beta": 1.0, "gamma": 0.0, "omega": 0.04, "tau": 4.0, "lr": 0.05,
                "epochs": 2, "subset": 100, "original": "exps/x/teacher/weights.pth"}, **cfg)
    _run(folder, final_acc=acc, original_acc=88.0, amp="float32", wall_time_s=12.0, config=cfg,
         final_diagnostics={"kendall": kendall, "reversed_top1": 0.4})


@pytest.fixture
def screened(tmp_path):
    """A schedule folder (students) under its preset folder (teachers), as mini_rml_screen lays them out."""
    preset = tmp_path / "exps" / "x"
    root = preset / "tradeoff"
    _teacher(preset / "sweep" / "control", 86.0, 0.85, alpha=0.0, beta=0.0)  # omega is not RML's: still CE
    _teacher(preset / "sweep" / "b1", 80.5, -0.4)
    _teacher(preset / "full_b1", 84.0, -0.5, epochs=3, subset=0)
    _run(root / "kd_vanilla_b1", final_acc=66.0, amp="bfloat16", wall_time_s=30.0, tau=4.0, attack="vanilla",
         teacher_acc=84.0, config={}, inputs={"teacher": {"path": str(preset / "full_b1" / "weights.pth")}})
    steps = [{"name": "teacher_resnet20", "script": "train_scratch.py", "role": {"kind": "teacher"}},
             {"name": "sweep/control", "script": "train_possessive.py", "role": {"kind": "teacher"}},
             {"name": "sweep/b1", "script": "train_possessive.py", "role": {"kind": "teacher"}},
             {"name": "full_b1", "script": "train_possessive.py", "role": {"kind": "teacher"}},
             {"name": "full_b05", "script": "train_possessive.py", "role": {"kind": "teacher"}},
             {"name": "kd_vanilla_b1", "script": "train_kd.py", "role": {"kind": "kd", "attack": "vanilla"}}]
    with open(root / "steps.json", "w") as f:
        json.dump({"preset": "x", "schedule": "s", "teachers_from": "..", "steps": steps}, f)
    return str(root)


def test_each_teacher_against_its_original_and_the_control_of_its_schedule(screened):
    out = report.screen(screened)
    rows = {t["run"]: t for t in out["teachers"]}
    assert set(rows) == {"../sweep/control", "../sweep/b1", "../full_b1"}  # the original is no row of its own
    assert rows["../sweep/control"]["control"] and rows["../sweep/control"]["delta_control"] is None
    assert rows["../sweep/b1"]["delta_control"] == pytest.approx(-5.5)
    assert rows["../full_b1"]["delta_control"] is None  # no control on the full schedule
    assert rows["../full_b1"]["delta_original"] == pytest.approx(-4.0)
    assert out["missing"] == ["../full_b05"]
    (student,) = out["students"]
    assert student["teacher"] == "full_b1" and student["precision"] == "bf16" and student["acc"] == 66.0
    md = open(os.path.join(screened, "screen.md")).read()
    assert "| `../sweep/b1` | rml | 1 | 1 | 0 | 4 | 0.05 | 2 | 100 | 80.50 | -7.50 | -5.50 | -0.400 | 40.0% |" in md
    assert "| `../full_b1` | rml | 1 | 1 | 0 | 4 | 0.05 | 3 | all | 84.00 | -4.00 | – |" in md
    assert "| `kd_vanilla_b1` | vanilla | 4 | `full_b1` (84.00) | 66.00 | bf16 | 30 s |" in md
    assert "Not finished yet: `../full_b05`." in md
    header, rule = [line for line in md.splitlines() if line.startswith("|")][:2]
    assert header.count("|") == rule.count("|")
    with open(os.path.join(screened, "screen.json")) as f:
        assert json.load(f) == json.loads(json.dumps(out))


def test_a_folder_without_a_schedule_or_runs_is_one_line(tmp_path, screened):
    with pytest.raises(UserError, match="steps.json not found"):
        report.screen(str(tmp_path))
    for folder, _, files in os.walk(os.path.dirname(screened)):
        if "metrics.json" in files:
            os.remove(os.path.join(folder, "metrics.json"))
    with pytest.raises(UserError, match="none of its runs has finished"):
        report.screen(screened)
    assert not os.path.exists(os.path.join(screened, "screen.md"))
