"""Provenance: runs record the weights they loaded and produced, a --resume never changes what a run
computes, and report.py never shows a student beside a teacher it was not distilled from."""
import json
import os
import shutil

import pytest
import torch

import report
import train_dfad
import train_kd
import train_possessive
import train_scratch
from conftest import TINY, file_bytes, make_exp, read_json, run_main
from utils.checkpoint import WEIGHTS_FILE, load_checkpoint, weights_sha256
from utils.config import NON_RESULT_KEYS
from utils.engine import Engine
from utils.errors import UserError

SCRIPTS = {"train_scratch.py": train_scratch, "train_possessive.py": train_possessive, "train_kd.py": train_kd,
           "train_dfad.py": train_dfad}
DFAD = {"model": "cnn_small", "epochs": 1, "batch_size": 8, "eval_batch_size": 50, "iters_per_epoch": 2, "k": 2,
        "nz": 16, "ngf": 8, "lr": 0.05, "amp": "off", "milestones": [], "log_every": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_root):
    """One finished tiny run of each script: original (scratch) -> RML -> KD and DFAD students."""
    base = tmp_path_factory.mktemp("prov")
    tiny = dict(TINY, data_root=cifar_root, epochs=1)
    out = {"train_scratch.py": make_exp(base / "original", **tiny)}
    assert run_main(train_scratch.main, ["--save_path", out["train_scratch.py"]]) == 0
    original = os.path.join(out["train_scratch.py"], WEIGHTS_FILE)
    out["train_possessive.py"] = make_exp(base / "rml", **dict(tiny, method="rml", original=original,
                                                                init_from_original=True, model="cnn_small"))
    assert run_main(train_possessive.main, ["--save_path", out["train_possessive.py"]]) == 0
    teacher = os.path.join(out["train_possessive.py"], WEIGHTS_FILE)
    out["train_kd.py"] = make_exp(base / "kd", **dict(tiny, teacher=teacher, attack="vanilla"))
    assert run_main(train_kd.main, ["--save_path", out["train_kd.py"]]) == 0
    out["train_dfad.py"] = make_exp(base / "dfad", **dict(DFAD, data_root=cifar_root, teacher=teacher))
    assert run_main(train_dfad.main, ["--save_path", out["train_dfad.py"]]) == 0
    return out


# ------------------------------------------------------------------------------------------ records
def test_every_run_records_its_weights_and_inputs(runs):
    digests = {}
    for script, folder in runs.items():
        metrics = read_json(os.path.join(folder, "metrics.json"))
        weights = load_checkpoint(os.path.join(folder, WEIGHTS_FILE))
        assert set(weights) >= {"model", "arch", "num_classes", "dataset", "mean", "std"}
        assert "optimizer" not in weights and "history" not in weights  # weights only
        assert metrics["weights_sha256"] == weights_sha256(weights["model"]) == weights["weights_sha256"]
        # the weights file holds the same weights as the run's last.pth
        assert weights_sha256(load_checkpoint(os.path.join(folder, "last.pth"))["model"]) == metrics["weights_sha256"]
        digests[script] = metrics
    assert digests["train_scratch.py"]["inputs"] == {}
    assert digests["train_possessive.py"]["inputs"]["original"]["weights_sha256"] == \
        digests["train_scratch.py"]["weights_sha256"]
    for script in ("train_kd.py", "train_dfad.py"):
        assert digests[script]["inputs"]["teacher"]["weights_sha256"] == \
            digests["train_possessive.py"]["weights_sha256"]


def test_weights_digest_ignores_the_file_and_sees_every_weight():
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.zeros(2), "n": torch.tensor(3)}
    same = {k: v.clone() for k, v in reversed(list(sd.items()))}
    assert weights_sha256(sd) == weights_sha256(same)
    changed = dict(sd, **{"a.bias": torch.tensor([0.0, 1e-7])})
    assert weights_sha256(changed) != weights_sha256(sd)
    assert weights_sha256(dict(sd, **{"a.weight": sd["a.weight"].reshape(3, 2)})) != weights_sha256(sd)
    assert weights_sha256(dict(sd, **{"a.bias": sd["a.bias"].double()})) != weights_sha256(sd)


# ------------------------------------------------------------------------------------------ resume
CHANGES = {
    "train_scratch.py": [("label_smoothing", "0.1"), ("lr", "0.01"), ("seed", "1"), ("epochs", "2")],
    "train_possessive.py": [("method", "nasty"), ("alpha", "0.5"), ("beta", "4"), ("gamma", "0.1"),
                            ("omega", "0.1"), ("tau", "2"), ("reverse_scope", "all")],
    "train_kd.py": [("attack", "tckd"), ("tau", "2"), ("alpha", "0.5"), ("dkd_beta", "2"), ("teacher", "ORIGINAL")],
    "train_dfad.py": [("k", "3"), ("lr_G", "0.01"), ("nz", "8"), ("iters_per_epoch", "3"), ("teacher", "ORIGINAL")],
}


@pytest.mark.parametrize("script,key,value", [(s, k, v) for s, changes in CHANGES.items() for k, v in changes])
def test_resume_that_changes_the_result_is_refused_and_changes_nothing(runs, tmp_path, capsys, script, key, value):
    folder = str(tmp_path / "run")
    shutil.copytree(runs[script], folder)
    before = file_bytes(folder)
    if value == "ORIGINAL":  # another teacher: the original the RML teacher was trained from
        value = os.path.join(runs["train_scratch.py"], WEIGHTS_FILE)
    code = run_main(SCRIPTS[script].main, ["--save_path", folder, "--resume", f"--{key}", value])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"{key}=" in lines[0] and "cannot resume" in lines[0], err
    assert file_bytes(folder) == before


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_resume_of_a_finished_run_leaves_it_as_it_was(runs, tmp_path, capsys, script):
    folder = str(tmp_path / "run")
    shutil.copytree(runs[script], folder)
    before = file_bytes(folder)
    assert run_main(SCRIPTS[script].main, ["--save_path", folder, "--resume"]) == 2
    assert "is finished" in capsys.readouterr().err
    assert file_bytes(folder) == before


def test_resume_against_a_retrained_teacher_is_refused(runs, tmp_path, capsys):
    """Same teacher path, other weights (the teacher was trained again): the student cannot resume."""
    folder = str(tmp_path / "kd")
    shutil.copytree(runs["train_kd.py"], folder)
    os.remove(os.path.join(folder, "metrics.json"))  # an unfinished run, as far as the resume goes
    teacher = str(tmp_path / "teacher.pth")
    ckpt = load_checkpoint(read_json(os.path.join(folder, "config.json"))["teacher"])
    ckpt["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, teacher)
    with open(os.path.join(folder, "params.json")) as f:
        params = json.load(f)
    before = file_bytes(folder)
    # the path is the one the run was made with: copy the changed teacher over it, then restore it
    original_path = params["teacher"]
    kept = original_path + ".kept"
    shutil.copy(original_path, kept)
    try:
        shutil.copy(teacher, original_path)
        assert run_main(train_kd.main, ["--save_path", folder, "--resume"]) == 2
    finally:
        shutil.move(kept, original_path)
    err = capsys.readouterr().err
    assert "cannot resume: the teacher" in err and "now has weights" in err
    assert file_bytes(folder) == before


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_result_key_of_every_script_is_kept_on_resume(runs, script):
    """The rule is derived from the script's own keys: every key but NON_RESULT_KEYS is checked, so a key
    added to a script tomorrow is covered without touching a list."""
    module = SCRIPTS[script]
    folder = runs[script]
    cfg = read_json(os.path.join(folder, "config.json"))
    checked = [k for k in module.DEFAULTS if k not in NON_RESULT_KEYS]
    assert len(checked) >= len(module.DEFAULTS) - len(NON_RESULT_KEYS)
    for key in checked:
        changed = dict(cfg, **{key: ["not", "the", "same"]})
        with pytest.raises(UserError, match=f"with {key}="):
            Engine(changed, folder, script, resume=True)
    for key in NON_RESULT_KEYS & set(module.DEFAULTS):  # these may change, then the finished run is refused
        with pytest.raises(UserError, match="is finished"):
            Engine(dict(cfg, **{key: cfg[key]}), folder, script, resume=True)


# ------------------------------------------------------------------------------------------ report
@pytest.fixture(scope="module")
def chain(tiny_chain):
    return tiny_chain[0]


def test_report_says_every_row_sits_beside_its_teacher(chain):
    res = report.collect(chain)
    assert res["provenance"] and all(p["status"] == "ok" for p in res["provenance"].values())
    text = open(os.path.join(chain, "results.md")).read()
    assert "every row sits beside the teacher it was trained from" in text and "✗" not in text


def test_report_marks_a_student_of_another_teacher_and_strict_refuses(chain, tmp_path, capsys):
    exp_root = str(tmp_path / "tiny")
    shutil.copytree(chain, exp_root)
    path = os.path.join(exp_root, "kd_tckd_rml_cnn_small", "metrics.json")
    metrics = read_json(path)
    metrics["inputs"]["teacher"]["weights_sha256"] = "f" * 64
    with open(path, "w") as f:
        json.dump(metrics, f)
    assert run_main(report.main, [exp_root]) == 0
    text = open(os.path.join(exp_root, "results.md")).read()
    row = next(line for line in text.splitlines() if line.startswith("| possessive (RML) | tckd |"))
    assert "✗" in row
    assert "`kd_tckd_rml_cnn_small`: mismatch: trained from teacher weights ffffffffffff" in text
    others = [line for line in text.splitlines() if line.startswith("| ") and "| tckd |" not in line]
    assert not any("✗" in line for line in others)
    before = file_bytes(exp_root)
    capsys.readouterr()
    assert run_main(report.main, [exp_root, "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kd_tckd_rml_cnn_small" in err[0]
    assert file_bytes(exp_root) == before


def test_report_compares_a_rerun_with_a_reference(chain, tmp_path, capsys):
    ref = str(tmp_path / "ref")
    shutil.copytree(chain, ref)
    path = os.path.join(ref, "ls_cnn_small", "metrics.json")
    metrics = read_json(path)
    metrics["final_acc"] += 1.5
    with open(path, "w") as f:
        json.dump(metrics, f)
    assert run_main(report.main, [chain, "--compare", ref]) == 0
    text = open(os.path.join(chain, "comparison.md")).read()
    assert "| row | this run | reference | Δ | verdict here | verdict there |" in text
    ls = read_json(os.path.join(chain, "ls_cnn_small", "metrics.json"))["final_acc"]
    assert f"| cnn_small ls | {ls:.2f} | {ls + 1.5:.2f} | -1.50 |" in text
    assert "largest 1.50 (cnn_small ls)" in text
    assert text in capsys.readouterr().out
    os.remove(os.path.join(chain, "comparison.md"))
    assert run_main(report.main, [chain, "--compare", str(tmp_path / "nowhere")]) == 2
