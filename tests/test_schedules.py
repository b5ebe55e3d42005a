"""Every committed experiment beyond the grid is a schedule of the reproduction: `reproduce.py --schedule NAME
--dry_run` finds each of its runs done on a clone, every run folder of the experiment is one of its runs, and a
run of the schedule with nothing left to train rebuilds the committed report byte for byte."""
import json
import os
import shutil

import pytest

import report
import reproduce
from conftest import ROOT, read_json, run_main
from reproduction.presets import seeded
from reproduction.schedules import SCHEDULES, THREAT_P2_ROWS, schedule_plan, variant
from utils.config import changed_result_key


def _run_folders(root):
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "metrics.json"))
                  or os.path.isfile(os.path.join(root, d, "sweep.json")))




@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_a_schedules_dry_run_finds_every_committed_run_done(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    sched = SCHEDULES[name]
    assert run_main(reproduce.main, ["--schedule", name, "--dry_run"]) == 0
    out = capsys.readouterr().out.splitlines()
    steps = schedule_plan(name)
    runs = sched["steps"]()  # its own runs (the screening's own teachers among them), after its preset's teachers
    assert steps[len(steps) - len(runs):] == runs
    assert out[-1] == f"{len(steps)} steps: {len(steps)} done", out[-1]
    text = "\n".join(out)
    root = os.path.join("exps", sched["root"])
    assert runs and all(f"{os.path.normpath(os.path.join(root, s['name']))}: done" in text
                        for s in runs if s["role"]["kind"] != "teacher")
    # the schedule covers the whole experiment folder: every run in it is one of the schedule's runs, or (the
    # fp32 run) a copy of a teacher of the preset folder the schedule attacks
    names = {s["name"] for s in runs}
    root = os.path.join(ROOT, "exps", sched["root"])
    for folder in _run_folders(root):
        if folder in names:
            continue
        copy_of = os.path.join(ROOT, "exps", sched["preset"], folder, "metrics.json")
        assert os.path.isfile(copy_of), f"{root}/{folder} is in no schedule"
        with open(copy_of, "rb") as a, open(os.path.join(root, folder, "metrics.json"), "rb") as b:
            assert a.read() == b.read(), f"{root}/{folder} is neither a run of the schedule nor a teacher's copy"


def test_a_run_in_another_experiments_folder_is_found_before_this_one_exists(capsys, monkeypatch):
    """A schedule names a run of another experiment by its path from its own folder ("../mini_curve/..."); the
    dry run of a clone without the schedule's own folder yet still finds that run where it is."""
    monkeypatch.chdir(ROOT)
    root = os.path.join("exps", "mini_long_not_made_yet")
    assert not os.path.exists(root)
    assert run_main(reproduce.main, ["--schedule", "mini_long", "--dry_run", "--exp_root", root]) == 0
    out = capsys.readouterr().out
    assert "exps/mini_curve/kd_vanilla_original_cnn_e24: done" in out and "/../" not in out
    assert f"{root}/ls_cnn_e24: new" in out and not os.path.exists(root)


def test_a_run_two_experiments_share_is_trained_once_with_one_config():
    owner = {}
    for name in SCHEDULES:
        root = os.path.join("exps", SCHEDULES[name]["root"])
        for step in schedule_plan(name):
            if step["role"]["kind"] == "teacher":
                continue
            folder = os.path.normpath(os.path.join(root, step["name"]))
            if folder in owner:
                other = owner[folder]
                assert changed_result_key(other["params"], step["params"]) is None, folder
                assert step["name"].startswith("../") or other["name"].startswith("../"), folder
            owner[folder] = step
    assert "exps/mini_curve/kd_vanilla_original_cnn_e24" in owner


def test_a_schedules_runs_find_their_teachers_in_its_threat_models_battery():
    """rmlnasty is a teacher of the threat models' battery, not of the full-data grid: a schedule of a threat model
    that attacks it plans its teacher step (else its students would look stale, their teacher 'to be trained')."""
    from reproduction.plan import dependencies
    for name in SCHEDULES:
        steps = schedule_plan(name)
        teachers = {s["name"] for s in steps if s["role"]["kind"] == "teacher"}
        for step in steps:
            assert set(dependencies(step)) <= teachers | {s["name"] for s in steps}, (name, step["name"])
    assert "rmlnasty_resnet20" in {s["name"] for s in schedule_plan("threat_p2")}


def test_variant_changes_the_name_and_the_given_settings_alone():
    step = next(s for s in reproduce.plan("mini") if s["name"] == "ls_cnn")
    v = variant(step, "ls_cnn_e48", epochs=48)
    assert v["name"] == "ls_cnn_e48" and v["params"]["epochs"] == 48 and step["params"]["epochs"] == 3
    assert changed_result_key(step["params"], v["params"]) == "epochs"
    assert v["role"] == step["role"] and v["script"] == step["script"]


@pytest.mark.parametrize("name,report", [("mini_curve", "curve.md"), ("mini_fp32", "results.md"),
                                         ("mini_rml_screen", "screen.md")])
def test_a_schedule_with_nothing_to_train_rebuilds_its_committed_report(name, report, tmp_path, monkeypatch, capsys):
    sched = SCHEDULES[name]
    for folder in sorted({sched["preset"], sched["root"]}):  # a parent before the folder inside it
        if not os.path.exists(tmp_path / "exps" / folder):  # the screening's folder is inside its preset's
            shutil.copytree(os.path.join(ROOT, "exps", folder), tmp_path / "exps" / folder)
    monkeypatch.chdir(tmp_path)
    assert run_main(reproduce.main, ["--schedule", name, "--data_root", str(tmp_path)]) == 0
    assert "steps: " in capsys.readouterr().out
    for f in (report, {"mini_fp32": "comparison.md", "mini_rml_screen": "screen.json"}.get(name, "curve.json")):
        with open(os.path.join(ROOT, "exps", sched["root"], f), "rb") as a, open(tmp_path / "exps" / sched["root"] / f,
                                                                                 "rb") as b:
            assert a.read() == b.read(), f
    manifest = json.loads((tmp_path / "exps" / sched["root"] / "steps.json").read_text())
    assert manifest["schedule"] == name
    assert manifest["teachers_from"] == os.path.relpath(os.path.join("exps", sched["preset"]),
                                                        os.path.join("exps", sched["root"]))


@pytest.mark.parametrize("extra,what", [(["--seeds", "0"], "--seeds"), (["--threat", "p10"], "--threat"),
                                        (["--preset", "mini", "--amp", "off"], "--preset, --amp")])
def test_a_schedule_refuses_the_options_it_fixes_itself(extra, what, capsys):
    assert run_main(reproduce.main, ["--schedule", "mini_curve", "--dry_run"] + extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and what in err[0] and "--schedule mini_curve" in err[0], err


def test_an_unknown_schedule_names_the_known_ones(capsys):
    assert run_main(reproduce.main, ["--schedule", "mini_curves", "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "mini_curve" in err and "threat_curve" in err


def test_the_grids_dry_run_finds_every_committed_step_done(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert run_main(reproduce.main, ["--preset", "mini", "--dry_run"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    n = len(json.loads(open(os.path.join(ROOT, "exps", "mini", "steps.json")).read())["steps"])
    assert last == f"{n} steps: {n} done", last


@pytest.mark.parametrize("threat,schedule", [("full", "mini_long"), ("p10", "threat_skeptical"), ("p2", "threat_p2"),
                                             ("p2nl", "threat_p2nl")])
def test_a_threat_models_grid_goes_on_from_the_runs_its_schedule_landed(threat, schedule, capsys, monkeypatch):
    """The grid of a threat model trains into the folder where its first runs were committed as a schedule of the
    same steps: its dry run on a clone finds every one of them done, none to train again."""
    monkeypatch.chdir(ROOT)
    root = os.path.join("exps", SCHEDULES[schedule]["root"])
    seeds = {0, 1, 2} | {int(d.rsplit("_seed", 1)[1]) for d in _run_folders(root) if "_seed" in d}
    assert run_main(reproduce.main, ["--preset", "mini", "--threat", threat, "--seeds",
                                     ",".join(map(str, sorted(seeds))), "--dry_run"]) == 0
    out = capsys.readouterr().out
    done = {line.split()[2].rstrip(":") for line in out.splitlines() if line.endswith(": done")}
    landed = {os.path.join(root, d) for d in _run_folders(root)}
    assert landed and landed <= done, sorted(landed - done)[:3]


def test_the_committed_threat_summary_is_rebuilt_from_the_committed_folders(tmp_path, monkeypatch):
    """exps/threat_summary is derived from the landed threat-model folders: a row landed there without rebuilding
    it (the command on its last line) leaves it stale, and this fails."""
    monkeypatch.chdir(ROOT)
    committed = os.path.join("exps", "threat_summary")
    lines = open(os.path.join(committed, "summary.md"), encoding="utf-8").read().splitlines()
    command = next(line for line in lines if line.startswith("Rebuild with `python report.py "))
    folders = command.split("--threats ", 1)[1].rstrip("`.").split()
    assert run_main(report.main, [str(tmp_path), "--threats", *folders]) == 0
    rebuilt = open(tmp_path / "summary.md", encoding="utf-8").read().splitlines()
    assert [line for line in rebuilt if not line.startswith("Rebuild with")] == [
        line for line in lines if not line.startswith("Rebuild with")]
    with open(os.path.join(committed, "summary.json"), "rb") as a, open(tmp_path / "summary.json", "rb") as b:
        assert a.read() == b.read()


def _weights(root, name, seed):
    return read_json(os.path.join(ROOT, "exps", root, seeded(name, seed), "metrics.json"))["weights_sha256"]


@pytest.mark.parametrize("teacher", ["stingy", "posthoc"])
def test_the_landed_hard_label_students_of_an_argmax_keeping_defence_are_the_floors_weights(teacher):
    """Stingy (top-k) and post-hoc reversal keep the original's top-1, so the thief who learns their argmax alone
    trains the floor's student: docs/RESULTS.md says the p2 rows are the floor's bit for bit, seed by seed. A row
    landed from another config, data draw or teacher breaks it."""
    seeds = THREAT_P2_ROWS[f"kd_hardlabel_{teacher}_cnn"]
    assert seeds, "no landed seeds to compare"
    for seed in seeds:
        defended = _weights("threat_p2", f"kd_hardlabel_{teacher}_cnn", seed)
        assert defended == _weights("threat_p2", "kd_hardlabel_original_cnn", seed), seed
