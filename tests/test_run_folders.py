"""No command loses a finished run: a finished folder is refused unless --overwrite, one writer per folder
(lock), errors that name their real source with close matches, run folders that say what ran."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import reproduce
import train_dfad
import train_kd
import train_possessive
import train_scratch
from conftest import ROOT, TINY, file_bytes, make_exp, read_json, run_main
from utils.checkpoint import WEIGHTS_FILE
from utils.config import CHOICES
from utils.errors import UserError
from utils.lock import LOCK_FILE

SCRIPTS = {"train_scratch.py": train_scratch, "train_possessive.py": train_possessive, "train_kd.py": train_kd,
           "train_dfad.py": train_dfad}
DFAD = {"model": "cnn_small", "epochs": 1, "batch_size": 8, "eval_batch_size": 50, "iters_per_epoch": 2, "k": 2,
        "nz": 16, "ngf": 8, "lr": 0.05, "amp": "off", "milestones": [], "log_every": 2}


def _lines(err):
    return [line for line in err.splitlines() if line.strip() and "it/s" not in line and "s/it" not in line]


def _one_error(err, *patterns):
    lines = _lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_root):
    """One finished tiny run of each script (the KD one a DKD run, whose warm-up is clamped)."""
    base = tmp_path_factory.mktemp("folders")
    tiny = dict(TINY, data_root=cifar_root, epochs=1)
    out = {"train_scratch.py": make_exp(base / "original", **tiny)}
    assert run_main(train_scratch.main, ["--save_path", out["train_scratch.py"]]) == 0
    original = os.path.join(out["train_scratch.py"], WEIGHTS_FILE)
    out["train_possessive.py"] = make_exp(base / "rml", **dict(tiny, method="rml", original=original,
                                                                init_from_original=True))
    assert run_main(train_possessive.main, ["--save_path", out["train_possessive.py"]]) == 0
    teacher = os.path.join(out["train_possessive.py"], WEIGHTS_FILE)
    out["train_kd.py"] = make_exp(base / "kd", **dict(tiny, teacher=teacher, attack="dkd", _script="train_kd.py"))
    assert run_main(train_kd.main, ["--save_path", out["train_kd.py"]]) == 0
    out["train_dfad.py"] = make_exp(base / "dfad", **dict(DFAD, data_root=cifar_root, teacher=teacher))
    assert run_main(train_dfad.main, ["--save_path", out["train_dfad.py"]]) == 0
    return out


def _copy(runs, script, tmp_path, name="run"):
    folder = str(tmp_path / name)
    shutil.copytree(runs[script], folder)
    return folder


# ------------------------------------------------------------------------------------------ finished runs
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_finished_run_is_refused_without_resume_and_stays_byte_identical(runs, tmp_path, capsys, script):
    folder = _copy(runs, script, tmp_path)
    before = file_bytes(folder)
    capsys.readouterr()
    assert run_main(SCRIPTS[script].main, ["--save_path", folder]) == 2
    _one_error(capsys.readouterr().err, "holds a finished run", "--resume", "--overwrite")
    assert file_bytes(folder) == before
    # --resume on it is refused too (nothing left to do), and --resume with --overwrite is a contradiction
    assert run_main(SCRIPTS[script].main, ["--save_path", folder, "--resume"]) == 2
    _one_error(capsys.readouterr().err, "is finished", "--overwrite")
    assert run_main(SCRIPTS[script].main, ["--save_path", folder, "--resume", "--overwrite"]) == 2
    _one_error(capsys.readouterr().err, "either --resume .* or --overwrite")
    assert file_bytes(folder) == before


def test_a_battery_with_one_finished_member_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    done = _copy(runs, "train_kd.py", tmp_path, "done")
    fresh = make_exp(tmp_path / "fresh", **read_json(os.path.join(done, "params.json")))
    before = {d: file_bytes(d) for d in (done, fresh)}
    capsys.readouterr()
    assert run_main(train_kd.main, ["--battery", f"{fresh},{done}"]) == 2
    _one_error(capsys.readouterr().err, re.escape(done) + " holds a finished run", "--overwrite")
    assert {d: file_bytes(d) for d in (done, fresh)} == before


def test_overwrite_keeps_the_old_results_until_the_first_checkpoint(runs, tmp_path, capsys, monkeypatch):
    folder = _copy(runs, "train_scratch.py", tmp_path)
    kept = {n: open(os.path.join(folder, n), "rb").read() for n in ("metrics.json", WEIGHTS_FILE)}

    def fail(self, batch):
        raise UserError("stopped in the first step")

    monkeypatch.setattr(train_scratch.ScratchTask, "loss", fail)
    assert run_main(train_scratch.main, ["--save_path", folder, "--overwrite"]) == 2
    assert {n: open(os.path.join(folder, n), "rb").read() for n in kept} == kept, "an overwrite stopped early lost them"
    monkeypatch.undo()
    capsys.readouterr()
    assert run_main(train_scratch.main, ["--save_path", folder, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "note: --overwrite: the finished run's metrics.json and weights.pth" in out
    assert "tracked by git" not in out  # a temp folder: nothing of it is tracked
    metrics = read_json(os.path.join(folder, "metrics.json"))
    assert metrics["final_acc"] == json.loads(kept["metrics.json"])["final_acc"]  # the same run, trained again
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))


def test_overwrite_of_files_tracked_by_git_says_so(runs, tmp_path, capsys):
    repo = tmp_path / "repo"
    folder = _copy(runs, "train_scratch.py", repo, "run")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-f", "run/metrics.json", f"run/{WEIGHTS_FILE}"], check=True)
    subprocess.run(git + ["commit", "-qm", "released run"], check=True)
    capsys.readouterr()
    assert run_main(train_scratch.main, ["--save_path", folder, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"note: \S*run/metrics\.json, \S*run/weights\.pth are tracked by git; this run replaces them", out)


def test_a_run_folder_given_as_a_checkpoint_uses_its_finished_weights(runs, tmp_path, capsys):
    folder = make_exp(tmp_path / "kd", **dict(read_json(os.path.join(runs["train_kd.py"], "params.json")),
                                              teacher=runs["train_possessive.py"], attack="vanilla"))
    capsys.readouterr()
    assert run_main(train_kd.main, ["--save_path", folder]) == 0
    assert "is a finished run folder: using its" in capsys.readouterr().out
    used = os.path.join(runs["train_possessive.py"], WEIGHTS_FILE)
    assert read_json(os.path.join(folder, "config.json"))["teacher"] == used
    assert read_json(os.path.join(folder, "metrics.json"))["inputs"]["teacher"]["path"] == used
    # a folder without a finished run is one line, and nothing is written
    empty = make_exp(tmp_path / "empty")
    other = make_exp(tmp_path / "kd2", **dict(read_json(os.path.join(folder, "params.json")), teacher=empty))
    before = file_bytes(other)
    assert run_main(train_kd.main, ["--save_path", other]) == 2
    _one_error(capsys.readouterr().err, "teacher .*empty is a folder that holds no finished run")
    assert file_bytes(other) == before


def test_config_json_records_the_clamped_dkd_warmup(runs):
    config = read_json(os.path.join(runs["train_kd.py"], "config.json"))
    assert config["dkd_warmup"] == 20  # the key as given
    assert config["_as_used"]["dkd_warmup"] == 0.25  # a quarter of the 1 epoch: what the run used
    assert read_json(os.path.join(runs["train_kd.py"], "metrics.json"))["dkd_warmup_epochs"] == 0.25


def test_a_sweep_into_a_single_run_folder_is_refused_or_replaces_it(runs, tmp_path, capsys):
    folder = _copy(runs, "train_kd.py", tmp_path)
    before = file_bytes(folder)
    capsys.readouterr()
    argv = ["--save_path", folder, "--tau_sweep", "2,4", "--attack", "vanilla"]
    assert run_main(train_kd.main, argv) == 2
    _one_error(capsys.readouterr().err, "holds a single run .*metrics.json.*not a sweep", "--overwrite")
    assert file_bytes(folder) == before
    assert run_main(train_kd.main, argv + ["--overwrite"]) == 0
    assert "removed the single run's metrics.json" in capsys.readouterr().out
    left = set(os.listdir(folder))
    assert {"sweep.json", "tau_2", "tau_4"} <= left
    assert not left & {"metrics.json", WEIGHTS_FILE, "last.pth", "best.pth", "log.csv", LOCK_FILE}
    # the same sweep again reuses its finished taus; with --overwrite it trains them again
    assert run_main(train_kd.main, argv) == 0
    assert capsys.readouterr().out.count("exists, skipped") == 2
    assert run_main(train_kd.main, argv + ["--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and out.count("note: --overwrite: the finished run's metrics.json") == 2


# ------------------------------------------------------------------------------------------ one writer
WAIT_AND_RUN = """
import os, sys, time
sys.path.insert(0, {root!r})
import train_scratch
print("ready", flush=True)
while not os.path.exists({go!r}):
    time.sleep(0.01)
sys.exit(train_scratch.main({argv!r}))
"""


def test_two_writers_on_one_folder_exactly_one_trains(tmp_path, cifar_root):
    folder = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root, epochs=4))
    go = str(tmp_path / "go")
    code = WAIT_AND_RUN.format(root=ROOT, go=go, argv=["--save_path", folder])
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:  # both have imported everything: they reach the folder within milliseconds of each other
        assert p.stdout.readline().strip() == "ready"
    open(go, "w").close()
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    winner = [p for p in procs if p.returncode == 0][0]
    loser_err = [o[1] for p, o in zip(procs, outs) if p.returncode == 2][0]
    _one_error(loser_err, f"run folder {re.escape(folder)} is in use by process {winner.pid}")
    with open(os.path.join(folder, "train.log")) as f:
        assert f.read().count("done: final test acc") == 1
    assert read_json(os.path.join(folder, "metrics.json"))["epochs"] == 4
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_lock_is_taken_over_with_a_line(tmp_path, cifar_root, capsys):
    folder = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root, epochs=1))
    pid = _dead_pid()
    with open(os.path.join(folder, LOCK_FILE), "w") as f:
        f.write(f"{pid}\n")
    capsys.readouterr()
    assert run_main(train_scratch.main, ["--save_path", folder]) == 0
    assert f"took over the stale lock {os.path.join(os.path.abspath(folder), LOCK_FILE)} of process {pid}" in \
        capsys.readouterr().out
    assert os.path.isfile(os.path.join(folder, "metrics.json"))
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p.pid
    p.kill()
    p.wait()


def test_a_held_lock_stops_a_run_and_a_reproduce(tmp_path, cifar_root, capsys, live_pid):
    folder = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root, epochs=1))
    with open(os.path.join(folder, LOCK_FILE), "w") as f:
        f.write(f"{live_pid}\n")
    before = file_bytes(folder)
    capsys.readouterr()
    assert run_main(train_scratch.main, ["--save_path", folder]) == 2
    _one_error(capsys.readouterr().err, f"is in use by process {live_pid}")
    assert file_bytes(folder) == before
    root = tmp_path / "exp_root"
    root.mkdir()
    (root / LOCK_FILE).write_text(f"{live_pid}\n")
    before = file_bytes(str(root))
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", str(root)]) == 2
    _one_error(capsys.readouterr().err, f"experiment root {re.escape(str(root))} is in use by process {live_pid}")
    assert file_bytes(str(root)) == before


# ------------------------------------------------------------------------------------------ errors
def test_no_prefix_matching_of_flags(runs, tmp_path, capsys):
    folder = make_exp(tmp_path / "run", **read_json(os.path.join(runs["train_scratch.py"], "params.json")))
    before = file_bytes(folder)
    assert run_main(train_scratch.main, ["--save_path", folder, "--epoch", "1"]) == 2
    _one_error(capsys.readouterr().err, "command line: unrecognized arguments: --epoch 1", "did you mean --epochs")
    assert run_main(reproduce.main, ["--preset", "tiny", "--dry"]) == 2
    _one_error(capsys.readouterr().err, "unrecognized arguments: --dry", "did you mean --dry_run")
    assert file_bytes(folder) == before


def test_a_bad_value_names_its_real_source_and_the_close_match(runs, tmp_path, capsys):
    params = read_json(os.path.join(runs["train_kd.py"], "params.json"))
    folder = make_exp(tmp_path / "run", **params)
    before = file_bytes(folder)
    for argv, patterns in (
            (["--model", "resnet_20"], ["^error: command line: unknown model 'resnet_20' \\(did you mean 'resnet20'"]),
            (["--attack", "dkdd"], ["^error: command line: 'attack' must be one of", "did you mean 'dkd'"]),
            (["--optimizer", "adm"], ["^error: command line: 'optimizer'", "did you mean 'adam'"]),
            (["--tau", "-1"], ["^error: command line: 'tau' must be > 0"])):
        assert run_main(train_kd.main, ["--save_path", folder] + argv) == 2
        _one_error(capsys.readouterr().err, *patterns)
    assert file_bytes(folder) == before
    # the same values in params.json are params.json's
    for key, value, pattern in (("model", "resnet_20", "unknown model"), ("attack", "dkdd", "'attack' must be"),
                                ("tau", -1, "'tau' must be > 0")):
        bad = make_exp(tmp_path / f"bad_{key}", **dict(params, **{key: value}))
        assert run_main(train_kd.main, ["--save_path", bad]) == 2
        _one_error(capsys.readouterr().err, re.escape(os.path.join(bad, "params.json")) + ": " + pattern)
        # and a good value on the command line fixes it
    bad = os.path.join(str(tmp_path), "bad_model")
    assert run_main(train_kd.main, ["--save_path", bad, "--model", "cnn_small", "--epochs", "0"]) == 2
    _one_error(capsys.readouterr().err, "^error: command line: 'epochs' must be > 0")


def test_an_unknown_key_suggests_the_close_match_only(runs, tmp_path, capsys):
    params = read_json(os.path.join(runs["train_scratch.py"], "params.json"))
    folder = make_exp(tmp_path / "run", **dict(params, epoch=3))
    assert run_main(train_scratch.main, ["--save_path", folder]) == 2
    line = _one_error(capsys.readouterr().err, "unknown key 'epoch' \\(did you mean 'epochs'\\?\\)", "--help")
    assert "label_smoothing" not in line  # no list of every key


def test_a_folder_of_another_script_says_which(runs, tmp_path, capsys):
    folder = _copy(runs, "train_kd.py", tmp_path)
    os.remove(os.path.join(folder, "metrics.json"))
    before = file_bytes(folder)
    assert run_main(train_dfad.main, ["--save_path", folder]) == 2
    _one_error(capsys.readouterr().err, "is the folder of a train_kd.py run \\(its '_script'\\), not of train_dfad.py",
               "python train_kd.py --save_path")
    assert file_bytes(folder) == before


def test_help_shows_every_choice(capsys):
    import models
    from utils.attacks import ATTACKS
    from utils.defences import DEFENCES
    from utils.defences import REVERSE_SCOPES
    for module, extra in ((train_kd, [list(ATTACKS), ATTACKS["rereverse"].TARGETS]),
                          (train_possessive, [list(DEFENCES), REVERSE_SCOPES]), (train_scratch, []),
                          (train_dfad, [train_dfad.G_OPTIMIZERS])):
        assert run_main(module.main, ["--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for options in list(CHOICES.values()) + [models.names()] + extra:
            assert "one of: " + ", ".join(options) in text, (module.__name__, options)
        assert "--overwrite" in text


def test_download_is_a_flag_in_every_script_and_in_reproduce():
    from utils.config import parse_config
    args, _ = parse_config("x", train_scratch.DEFAULTS, ["--save_path", "d", "--download"])
    assert args.cfg_download == "true"
    args, _ = parse_config("x", train_scratch.DEFAULTS, ["--save_path", "d", "--download", "false", "--epochs", "2"])
    assert args.cfg_download == "false" and args.cfg_epochs == "2"


def test_reproduce_only_takes_several_parts(tmp_path, capsys):
    root = tmp_path / "exps"
    args = ["--preset", "tiny", "--data_root", str(tmp_path / "none"), "--exp_root", str(root), "--dry_run"]
    assert run_main(reproduce.main, args + ["--only", "ls_cnn_small,kd_vanilla_original"]) == 0
    listed = re.findall(r"\] \S+ \S+/(\S+):", capsys.readouterr().out)
    assert listed and set(listed) == {"ls_cnn_small", "kd_vanilla_original_cnn_small"}
    assert run_main(reproduce.main, args + ["--only", ",ls_cnn_small,"]) == 0  # empty parts are ignored
    assert set(re.findall(r"\] \S+ \S+/(\S+):", capsys.readouterr().out)) == {"ls_cnn_small"}
    assert run_main(reproduce.main, args + ["--only", ","]) == 2  # commas alone would select every step
    _one_error(capsys.readouterr().err, "--only ',' names no step")
    assert not root.exists()


def test_reproduce_only_that_matches_nothing_is_an_error(tmp_path, capsys):
    root = tmp_path / "exps"
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", str(tmp_path / "none"), "--exp_root",
                                     str(root), "--only", "no_such_step", "--dry_run"]) == 2
    _one_error(capsys.readouterr().err, "--only 'no_such_step' matches none of the .* steps")
    assert not root.exists()


def test_reproduce_dry_run_needs_no_data(tmp_path, capsys):
    root = tmp_path / "exps"
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", str(tmp_path / "none"), "--exp_root",
                                     str(root), "--dry_run", "--download"]) == 0
    assert "steps: " in capsys.readouterr().out
    assert not root.exists() and not (tmp_path / "none").exists()
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", str(tmp_path / "none"), "--exp_root",
                                     str(root)]) == 2
    _one_error(capsys.readouterr().err, "data_root .* does not exist")


# ------------------------------------------------------------------------------------------ defaults
def _preset_params(name):
    return {s["name"]: s["params"] for s in reproduce.plan("mini")}[name]


def test_possessive_defaults_are_the_mini_presets_rml_settings(capsys):
    rml = _preset_params("rml_resnet20")
    for key in ("init_from_original", "epochs", "lr", "beta", "alpha", "gamma", "tau", "batch_size", "schedule",
                "optimizer", "weight_decay"):
        assert train_possessive.DEFAULTS[key] == rml[key], key
    assert train_possessive.DEFAULTS["method"] == "rml"
    assert run_main(train_possessive.main, ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--beta A NUMBER default: 0.3; the mini preset's RML setting" in text


def test_dfad_defaults_are_the_mini_presets_settings(capsys):
    dfad = _preset_params("dfad_original_resnet8")
    for key in ("epochs", "iters_per_epoch", "k", "batch_size", "lr", "schedule", "milestones"):
        assert train_dfad.DEFAULTS[key] == dfad[key], key
    assert train_dfad.DEFAULTS["epochs"] < 500
    assert run_main(train_dfad.main, ["--help"]) == 0
    assert "the paper's: epochs 500" in " ".join(capsys.readouterr().out.split())
