"""reproduce.py --threat and report.py --threats: the threat models as an axis of the reproduction."""
import os
import subprocess
import sys

import pytest

import reproduce
import report
from conftest import ROOT, file_bytes, read_json, run_main
from reporting.threats import summary_cell


def test_a_threat_model_plans_every_student_arm_on_its_images_and_labels():
    for name, labels in (("p10", True), ("p10nl", False)):
        steps = reproduce.plan("mini", seeds=[0, 1, 2], threat=name)
        students = [s for s in steps if s["role"]["kind"] != "teacher"]
        assert students and all(s["role"]["threat"] == name for s in students)
        assert not any(s["role"]["kind"] == "dfad" for s in steps)  # DFAD holds no images
        for s in students:
            p = s["params"]
            assert p["subset"] == 5000 and p["subset_seed"] == p["seed"] == s["role"]["seed"]
            assert p["epochs"] == reproduce.P10_EPOCHS
            assert p.get("labels", True) is (labels or s["role"]["kind"] != "kd")  # LS keeps its labels
        sources = {s["role"]["source"] for s in students if s["role"]["kind"] == "student"}
        assert sources == ({"scratch", "ls"} if labels else {"ls"})
        kd = [s for s in students if s["role"]["kind"] == "kd"]
        # every attack of the registry's battery, and the self-tuning thief picking two ways, against every
        # teacher, every seed
        assert len(kd) == 3 * len(reproduce.battery_teachers()) * (len(reproduce.battery_attacks()) + 2)
        assert "skeptical" in reproduce.battery_attacks()
        tuned = [s for s in kd if s["role"]["attack"] == "tuned"]
        assert len(tuned) == 3 * len(reproduce.battery_teachers())
        for s in tuned:
            p = s["params"]
            assert p["attack"] == "vanilla" and p["tau_sweep"] == [1.0, 4.0, 10.0, 20.0] and p["val_split"] == 500
            assert p.get("labels", True) is labels and "tau" not in p and "runs_from" not in p
        # by cross-entropy: the same sweep, reading the top-1 pick's runs in place (trained once)
        by_nll = {(s["role"]["teacher"], s["role"]["seed"]): s for s in kd if s["role"]["attack"] == "tuned_nll"}
        assert len(by_nll) == len(tuned)
        for s in tuned:
            twin = by_nll[s["role"]["teacher"], s["role"]["seed"]]
            assert twin["params"] == dict(s["params"], select_by="val_nll", runs_from=s["name"])
        assert any(s["role"]["teacher"] == "original" and s["role"]["attack"] == "hardlabel" for s in kd)  # the floor
    full = reproduce.plan("mini", seeds=[0], threat="full")
    assert all("subset" not in s["params"] for s in full)
    assert {s["name"] for s in full} >= {"ls_cnn_e24", "kd_tckd_nasty_cnn_e24"}  # the long schedule's folders


def test_a_run_another_experiment_trained_first_is_named_in_its_folder_not_trained_again():
    """The full-data curve's 24-epoch point is the long schedule's seed-0 vanilla KD from the original (presets:
    trained_in): the grid in its own folder names it in exps/mini_curve, and its dry run calls it done there;
    without the folder layout (--exp_root) it is an arm like any other, trained here."""
    name = "kd_vanilla_original_cnn_e24"
    alone = reproduce.plan("mini", seeds=[0, 1], threat="full")
    beside = reproduce.plan("mini", seeds=[0, 1], threat="full", siblings=True)
    moved = [(a["name"], b["name"]) for a, b in zip(alone, beside) if a["name"] != b["name"]]
    assert moved == [(name, f"../mini_curve/{name}")]  # seed 0's alone; seed 1's is the long schedule's own
    assert [a["params"] for a in alone] == [b["params"] for b in beside]
    curve = {s["name"]: s for s in reproduce.schedule_plan("mini_curve")}
    assert curve[name]["params"] == {s["name"]: s for s in alone}[name]["params"]  # the same run, trained once


@pytest.mark.parametrize("threat", ["p2nl", "p10nl"])
def test_a_label_free_threat_model_names_its_label_free_arms_in_its_labelled_twins_folder(threat):
    """Label smoothing and hard-label KD read no label a label-free thief lacks: they are the labelled twin's runs
    (the same images, schedule and weights), named in the twin's folder and trained once; every other arm is
    the threat model's own. Without a twin folder (reproduce.py --exp_root) every arm trains here."""
    twin = reproduce.PRESETS["mini"]["threats"][threat]["twin"]
    folder = reproduce.threat_folder("mini", twin)
    own = {s["name"]: s for s in reproduce.plan("mini", seeds=[0, 1, 2], threat=twin)}
    alone = reproduce.plan("mini", seeds=[0, 1, 2], threat=threat)
    shared = reproduce.plan("mini", seeds=[0, 1, 2], threat=threat, twin_folder=folder)
    assert [s["role"] for s in shared] == [s["role"] for s in alone]  # the same arms, the same table
    moved = 0
    for a, s in zip(alone, shared):
        role = s["role"]
        if role["kind"] != "teacher" and (role.get("source") == "ls" or role.get("attack") == "hardlabel"):
            assert s["name"] == f"../{folder}/{a['name']}"
            assert s["params"] == own[a["name"]]["params"]  # the twin's step as the twin's grid runs it
            assert "labels" not in s["params"] and role["threat"] == threat
            moved += 1
        else:
            assert s == a
    teachers = len(reproduce.battery_teachers())
    assert moved == 3 * (1 + teachers)  # per seed: label smoothing and every teacher's hard-label student


def test_a_label_free_grid_finds_its_twins_runs_done_and_trains_them_there_with_exp_root_here(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert run_main(reproduce.main, ["--preset", "mini", "--threat", "p2nl", "--seeds", "0", "--dry_run",
                                     "--only", "ls_,kd_hardlabel_original_"]) == 0
    out = capsys.readouterr().out
    assert "exps/threat_p2/ls_cnn: done" in out and "exps/threat_p2/kd_hardlabel_original_cnn: done" in out
    assert run_main(reproduce.main, ["--preset", "mini", "--threat", "p2nl", "--seeds", "0", "--dry_run",
                                     "--only", "ls_,kd_hardlabel_original_", "--exp_root", "exps/p2nl_elsewhere"]) == 0
    out = capsys.readouterr().out
    assert "exps/p2nl_elsewhere/ls_cnn: new" in out and "threat_p2/" not in out


def test_every_threat_model_arm_runs_in_fp32_unless_overridden():
    """The threat grid lands piece by piece on whatever machine a session has, and a verdict pairs the bar with
    each attack seed by seed: every arm of a subset threat model is pinned to fp32; reproduce.py --amp still wins."""
    for name in ("p10", "p10nl", "p2", "p2nl"):
        students = [s for s in reproduce.plan("mini", seeds=[0, 1], threat=name) if s["role"]["kind"] != "teacher"]
        assert students and {s["params"]["amp"] for s in students} == {"off"}
        teachers = [s for s in reproduce.plan("mini", seeds=[0], threat=name) if s["role"]["kind"] == "teacher"]
        assert all("amp" not in s["params"] for s in teachers)  # the shared teachers keep the preset's
        overridden = reproduce.plan("mini", seeds=[0], threat=name, amp="bf16")
        assert {s["params"]["amp"] for s in overridden if s["role"]["kind"] != "teacher"} == {"bf16"}
    # the full-data threat model's committed runs (exps/mini_long) are in the preset's own precision
    assert all("amp" not in s["params"] for s in reproduce.plan("mini", seeds=[0], threat="full"))


def test_the_committed_full_data_grid_keeps_the_attacks_its_runs_hold():
    """An attack that joins the registry's battery (the Skeptical student) joins every threat model at once, and
    the mini preset's full-data grid once its runs land: its plan names the attacks exps/mini holds."""
    grid = reproduce.plan("mini", seeds=[0, 1, 2])
    attacks = {s["role"]["attack"] for s in grid if s["role"]["kind"] == "kd"}
    assert attacks == set(reproduce.PRESETS["mini"]["grid_attacks"]) and "skeptical" not in attacks
    assert "tuned" not in attacks  # the self-tuning thief needs a threat model's validation split
    tiny = {s["role"]["attack"] for s in reproduce.plan("tiny") if s["role"]["kind"] == "kd"}
    assert tiny == set(reproduce.battery_attacks())


def test_the_committed_full_data_grid_keeps_the_teachers_its_runs_hold():
    """A defence that joins the registry's battery (RML + Nasty) is a teacher of every threat model at once, trained
    into the preset's folder by the first threat-model run; the full-data grid attacks the teachers exps/mini
    holds, and screens a battery defence outside them (--defences) with the first seed, as any variant."""
    names = reproduce.PRESETS["mini"]["grid_teachers"]
    assert "rmlnasty" in reproduce.battery_teachers() and "rmlnasty" not in names

    def teachers(steps, kind="teacher"):
        return [s["role"]["teacher"] for s in steps if s["role"]["kind"] == kind]

    assert teachers(reproduce.plan("mini", seeds=[0, 1, 2])) == names
    for threat in ("full", "p10", "p2nl"):
        steps = reproduce.plan("mini", seeds=[0, 1, 2], threat=threat)
        assert teachers(steps) == reproduce.battery_teachers()
        assert {s["role"]["seed"] for s in steps if s["role"].get("teacher") == "rmlnasty"
                and s["role"]["kind"] == "kd"} == {0, 1, 2}
    screened = reproduce.plan("mini", seeds=[0, 1, 2], defences=["rmlnasty"])
    assert teachers(screened) == names + ["rmlnasty"]
    assert {s["role"]["seed"] for s in screened if s["role"].get("teacher") == "rmlnasty"
            and s["role"]["kind"] == "kd"} == {0}
    rml = next(s for s in screened if s["name"] == "rmlnasty_resnet20")
    assert rml["params"]["method"] == "rmlnasty" and rml["params"]["original"] == "teacher_resnet20/weights.pth"


def test_an_unknown_threat_model_is_one_line(capsys):
    assert run_main(reproduce.main, ["--preset", "mini", "--threat", "p5", "--dry_run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no threat model 'p5'" in err[0] and "p10nl" in err[0]


def test_threat_model_runs_use_the_preset_teachers_and_the_threat_bar(threat_runs):
    teachers_root, roots, _ = threat_runs
    for name, labels in (("s50", True), ("s50nl", False)):
        root = roots[name]
        manifest = read_json(os.path.join(root, "steps.json"))
        assert manifest["threat"]["name"] == name and manifest["threat"]["bar"] == ("ls" if labels else "hardlabel")
        assert not any(d.startswith("teacher_") for d in os.listdir(root))  # teachers are the preset's, not retrained
        m = read_json(os.path.join(root, "kd_vanilla_nasty_cnn_small", "metrics.json"))
        assert m["thief"]["images"] == 50 and m["thief"]["labels"] is labels
        assert m["inputs"]["teacher"]["path"].startswith(teachers_root)
        ls = read_json(os.path.join(root, "ls_cnn_small", "metrics.json"))
        assert ls["thief"]["indices_sha256"] == m["thief"]["indices_sha256"]  # one seed, one set of images
        res = read_json(os.path.join(root, "results.json"))
        s = res["students"]["cnn_small"]
        floor = s["kd"]["original"]["hardlabel"]
        nasty = s["kd"]["nasty"]["vanilla"]
        assert nasty["delta_floor"] == pytest.approx(nasty["acc"] - floor["acc"])
        assert nasty["delta_ls"] == pytest.approx(nasty["acc"] - s["ls"]["acc"])
        assert (floor["verdict"] is None) is (not labels)  # without labels the floor is the bar, not a row judged
        text = open(os.path.join(root, "results.md")).read()
        assert f"Threat model `{name}`" in text and "Δ vs hard-label floor" in text
        assert ("hard-label floor (the bar)" in text) is (not labels)


def test_the_summary_has_a_column_per_threat_model(threat_runs):
    _, roots, out = threat_runs
    assert run_main(report.main, [out, "--threats", roots["s50"], roots["s50nl"]]) == 0
    text = open(os.path.join(out, "summary.md")).read()
    assert "`s50`" in text and "`s50nl`" in text and os.path.isfile(os.path.join(out, "fig_threats.png"))
    summary = read_json(os.path.join(out, "summary.json"))
    assert [m["threat"]["name"] for m in summary["threat_models"]] == ["s50", "s50nl"]
    row = summary["threat_models"][1]["rows"]["cnn_small/nasty"]
    assert row["strongest"] in reproduce.battery_attacks() + ["tuned"] and row["n"] == 1
    assert row["distillable_by"] == []  # one seed decides nothing


def test_a_summary_cell_says_what_holds_against_how_many_attacks_and_what_is_already_distillable():
    row = {"strongest": "dkd", "delta": 4.95, "n": 1, "verdict": "inconclusive", "resists_all": False, "attacks": 7,
           "distillable_by": ["vanilla"]}
    # the strongest attack on one seed does not hide vanilla's verdict on three
    assert summary_cell(row) == "dkd +4.95 (n=1), inconclusive; distillable by vanilla"
    assert summary_cell(dict(row, distillable_by=[])) == "dkd +4.95 (n=1), inconclusive"
    assert summary_cell(dict(row, verdict="distillable", distillable_by=["dkd", "vanilla"])) == (
        "dkd +4.95 (n=1), distillable")
    held = dict(row, delta=-7.9, verdict="KD-resistant", resists_all=True, attacks=1, distillable_by=[])
    assert summary_cell(held) == "dkd -7.90 (n=1), holds against 1 attack"
    assert summary_cell(dict(held, attacks=6)).endswith("holds against 6 attacks")
    # below the bar on one seed is KD-resistant by the rule, but the cell says it was not tested
    assert summary_cell(dict(held, attacks=6, attacks_few_seeds=2)).endswith(
        "holds against 6 attacks (2 on fewer than 3 seeds)")


def test_the_frontier_counts_the_self_tuning_thief_once_whichever_rule_picked_its_tau():
    from reporting.verdicts import frontier

    def arm(acc, n=3):
        accs = {s: acc + 0.1 * s for s in range(n)}
        return {"acc": acc + 0.1, "accs": accs, "n": n, "n_paired": n, "verdict": "KD-resistant"}

    kd = {"vanilla": arm(70.0), "tckd": arm(71.0), "tuned": arm(69.0), "tuned_nll": arm(69.5, n=2)}
    res = {"teachers": {"nasty": {"acc": 90.0}}, "dfad": {},
           "students": {"cnn": {"ls": arm(72.0), "kd": {"nasty": kd}}}}
    [row] = frontier(res)
    # four rows, three attacks; the rule run on two seeds is one attack on fewer than three
    assert (row["attacks"], row["attacks_few_seeds"], row["strongest"]) == (3, 1, "tckd")
    assert summary_cell(dict(row, delta=row["delta_ls"])).endswith(
        "holds against 3 attacks (1 on fewer than 3 seeds)")
    kd["tuned"] = arm(69.0, n=2)  # both rules short of seeds: still one attack
    assert frontier(res)[0]["attacks_few_seeds"] == 1


def test_the_summary_refuses_a_folder_without_a_threat_model(tiny_chain, tmp_path, capsys):
    exp_root, _ = tiny_chain
    before = file_bytes(exp_root)
    assert run_main(report.main, [str(tmp_path / "out"), "--threats", exp_root]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "names no threat model" in err[0]
    assert file_bytes(exp_root) == before
