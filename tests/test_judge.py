"""judge.py: the verdicts for a teacher the user brings, built as reproduce.py's grid builds them."""
import os
import subprocess
import sys

import pytest
import torch

import judge
from conftest import ROOT, read_json, run_main


def _judge(args, timeout=900):
    return subprocess.run([sys.executable, "judge.py"] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _accs(res, arch):
    s = res["students"][arch]
    out = {"ls": s["ls"]["accs"]}
    for teacher, attacks in s["kd"].items():
        for attack, a in attacks.items():
            out[f"{teacher}/{attack}"] = (a["accs"], a["verdict"], a.get("delta_ls"), a.get("delta_floor"))
    return out


@pytest.fixture(scope="module")
def judged(threat_runs, tmp_path_factory, cifar_root):
    """The grid's Nasty teacher and its original brought to judge.py, at both tiny threat models."""
    teachers_root, _, _ = threat_runs
    out = str(tmp_path_factory.mktemp("judge") / "nasty")
    done = _judge(["--teacher", os.path.join(teachers_root, "nasty_cnn"), "--original",
                   os.path.join(teachers_root, "teacher_cnn"), "--name", "nasty", "--preset", "tiny",
                   "--threat", "s50,s50nl", "--data_root", cifar_root, "--out", out, "--jobs", "2"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_a_grid_teacher_brought_to_judge_gets_the_grid_verdicts(judged, threat_runs):
    _, roots, _ = threat_runs
    for name in ("s50", "s50nl"):
        grid = read_json(os.path.join(roots[name], "results.json"))
        mine = read_json(os.path.join(judged, name, "results.json"))
        grid_rows = {k: v for k, v in _accs(grid, "cnn_small").items()
                     if k.split("/")[0] in ("ls", "nasty", "original")}
        assert _accs(mine, "cnn_small") == grid_rows  # same students, same accuracies, same verdicts
        assert mine["teachers"]["nasty"]["acc"] == grid["teachers"]["nasty"]["acc"]
        assert mine["teachers"]["nasty"]["delta"] == pytest.approx(grid["teachers"]["nasty"]["delta"])
        m = read_json(os.path.join(judged, name, "kd_vanilla_nasty_cnn_small", "metrics.json"))
        g = read_json(os.path.join(roots[name], "kd_vanilla_nasty_cnn_small", "metrics.json"))
        assert m["inputs"]["teacher"]["weights_sha256"] == g["inputs"]["teacher"]["weights_sha256"]
        assert m["thief"] == g["thief"]
        assert all(p["status"] == "ok" for p in mine["provenance"].values())
    # the label-free thief's label smoothing and hard-label students are the labelled thief's, trained once
    names = {s["name"] for s in read_json(os.path.join(judged, "s50nl", "steps.json"))["steps"]}
    assert {"../s50/ls_cnn_small", "../s50/kd_hardlabel_original_cnn_small",
            "../s50/kd_hardlabel_nasty_cnn_small"} <= names
    assert not os.path.exists(os.path.join(judged, "s50nl", "ls_cnn_small"))
    assert os.path.isfile(os.path.join(judged, "s50", "kd_hardlabel_nasty_cnn_small", "metrics.json"))
    assert (os.path.isfile(os.path.join(judged, "summary.md"))
            and os.path.isfile(os.path.join(judged, "fig_threats.png")))
    imported = read_json(os.path.join(judged, "teachers", "nasty", "metrics.json"))
    assert imported["imported"]["source_sha256"] == judge.file_sha256(imported["imported"]["source"])


def test_judge_resumes_with_nothing_left_to_do(judged, threat_runs, cifar_root):
    teachers_root, _, _ = threat_runs
    done = _judge(["--teacher", os.path.join(teachers_root, "nasty_cnn"), "--original",
                   os.path.join(teachers_root, "teacher_cnn"), "--name", "nasty", "--preset", "tiny",
                   "--threat", "s50,s50nl", "--out", judged, "--dry_run"])
    assert done.returncode == 0, done.stderr
    states = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert states and all(line.endswith(": done") for line in states)


def test_a_plain_state_dict_is_judged_against_its_own_argmax(threat_runs, tmp_path, cifar_root):
    """A file of another codebase (a bare state dict) without an original: the label-free bar is hard-label KD
    from the judged teacher itself."""
    teachers_root, _, _ = threat_runs
    ckpt = torch.load(os.path.join(teachers_root, "nasty_cnn", "weights.pth"), weights_only=True)
    plain = str(tmp_path / "plain.pt")
    torch.save({"module." + k: v for k, v in ckpt["model"].items()}, plain)
    out = str(tmp_path / "out")
    assert _judge(["--teacher", plain, "--preset", "tiny", "--threat", "s50nl", "--data_root", cifar_root,
                   "--out", out]).returncode == 2  # no architecture: one line, nothing written
    assert not os.path.exists(out)
    done = _judge(["--teacher", plain, "--teacher_arch", "cnn", "--wrap", "stingy", "--preset", "tiny",
                   "--threat", "s50nl", "--data_root", cifar_root, "--out", out, "--jobs", "2"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    res = read_json(os.path.join(out, "s50nl", "results.json"))
    s = res["students"]["cnn_small"]
    assert set(s["kd"]) == {"yours", "stingy-yours"} and "original" not in res["teachers"]
    assert s["kd"]["yours"]["hardlabel"]["verdict"] is None  # the bar is not judged against itself
    vanilla = s["kd"]["yours"]["vanilla"]
    assert vanilla["delta_floor"] == pytest.approx(vanilla["acc"] - s["kd"]["yours"]["hardlabel"]["acc"])
    text = open(os.path.join(out, "s50nl", "results.md")).read()
    assert "argmax of the judged teacher" in text
    m = read_json(os.path.join(out, "teachers", "yours", "metrics.json"))
    assert m["weights_sha256"] == ckpt["weights_sha256"]  # the same weights as the project's file
    assert m["imported"]["source_format"] != "this project's checkpoint"


def test_an_unfinished_teacher_is_refused_unless_allowed(threat_runs, tmp_path, cifar_root):
    teachers_root, _, _ = threat_runs
    last = os.path.join(teachers_root, "teacher_cnn", "last.pth")
    assert os.path.isfile(last)
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "last.pth").write_bytes(open(last, "rb").read())  # a run folder without metrics.json
    out = str(tmp_path / "out")
    args = ["--teacher", str(unfinished / "last.pth"), "--preset", "tiny", "--threat", "s50", "--out", out,
            "--data_root", cifar_root]
    done = _judge(args + ["--dry_run"])
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1 and "allow_unfinished_teacher" in err[0]
    assert not os.path.exists(out)
    done = _judge(args + ["--dry_run", "--allow_unfinished_teacher"])
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("extra, words", [
    (["--wrap", "keyed"], "--wrap"),
    (["--name", "original"], "--name"),
    (["--threat", "p5"], "no threat model 'p5'"),
    (["--student", "nonet"], "--student"),
    (["--teacher_mean", "0.5,0.5"], "--teacher_mean"),
])
def test_bad_input_is_one_line(threat_runs, extra, words, capsys):
    teachers_root, _, _ = threat_runs
    argv = ["--teacher", os.path.join(teachers_root, "nasty_cnn"), "--preset", "tiny", "--dry_run"] + extra
    assert run_main(judge.main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and words in err[0]


def test_the_released_nasty_teacher_brought_to_judge_at_p2_plans_the_grids_committed_students():
    """The README's demonstration at real scale without training: judge.py's students for the released Nasty
    teacher (and its original) at p2 are the configs of the grid's committed runs in exps/threat_p2, step by step (the
    paths of the teacher and of a sweep's runs_from aside), and the teacher it would import carries the weights those
    runs recorded (every run of a sweep). With the tiny chain's bit-for-bit test above, the grid's verdicts are what
    the one command rebuilds."""
    from import_teacher import load_teacher
    from utils.checkpoint import checkpoint_digest
    released = {"nasty": os.path.join("exps", "mini", "nasty_resnet20"),
                "original": os.path.join("exps", "mini", "teacher_resnet20")}
    args = judge.parse_args(["--teacher", released["nasty"], "--original", released["original"], "--name", "nasty",
                             "--threat", "p2"])
    _, ckpt, dataset = judge.plan(args)
    steps = judge.student_steps("mini", dataset, (0, 1, 2), ckpt, "p2")
    grid = os.path.join(ROOT, "exps", "threat_p2")
    where = {ckpt[name]: f"{released[name]}/weights.pth".replace(os.sep, "/") for name in released}
    digest = {path: checkpoint_digest(load_teacher(os.path.join(ROOT, path), "teacher", dataset)[2])
              for path in where.values()}  # each released teacher read once, not once per step
    compared = []
    for step in steps:
        folder = os.path.join(grid, step["name"])
        if step["params"].get("tau_sweep"):  # a sweep's record: the metrics.json of each run it picked among
            if not os.path.isfile(os.path.join(folder, "sweep.json")):
                continue
            runs = [os.path.join(folder, r) for r in read_json(os.path.join(folder, "sweep.json"))["runs"].values()]
        elif os.path.isfile(os.path.join(folder, "metrics.json")):
            runs = [folder]
        else:
            continue
        mine = {k: where.get(v, v) if k == "teacher" else v for k, v in step["params"].items()}
        if "runs_from" in mine:  # a step of the same folder, resolved against it as resolve_paths does
            mine["runs_from"] = "/".join(("exps", "threat_p2", mine["runs_from"]))
        theirs = {k: v for k, v in read_json(os.path.join(folder, "params.json")).items() if not k.startswith("_")}
        assert mine == theirs, step["name"]
        if "teacher" in mine:
            for r in runs:
                recorded = read_json(os.path.join(r, "metrics.json"))["inputs"]["teacher"]["weights_sha256"]
                assert digest[mine["teacher"]] == recorded, r
        compared.append(step["name"])
    # every one of the command's steps has run in the grid (README: "all 60 have run"), so none was skipped above
    assert sorted(compared) == sorted(step["name"] for step in steps)
    assert len(compared) == 60
    # the bar, the floor and Nasty's whole column on three seeds at least (the committed p2 rows of these teachers)
    for name in ("ls_cnn", "kd_hardlabel_original_cnn", "kd_vanilla_original_cnn",
                 "kd_vanilla_nasty_cnn", "kd_dkd_nasty_cnn", "kd_tckd_nasty_cnn", "kd_markov_nasty_cnn",
                 "kd_rereverse_nasty_cnn", "kd_hardlabel_nasty_cnn", "kd_skeptical_nasty_cnn", "kd_tuned_nasty_cnn",
                 "kd_tunednll_nasty_cnn"):
        assert {name, f"{name}_seed1", f"{name}_seed2"} <= set(compared), name
