"""The whole chain on the tiny preset: every step runs, results.md has every row, re-runs skip, a killed
run completes on re-run."""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import report
import reproduce
from conftest import ROOT, TEST_DEVICE, make_exp, read_json, run_main


def _reproduce(exp_root, data_root):
    return [sys.executable, "reproduce.py", "--preset", "tiny", "--data_root", data_root, "--exp_root", exp_root,
            "--device", TEST_DEVICE]


@pytest.fixture(scope="module")
def chain(tiny_chain):
    return tiny_chain


def test_every_step_has_metrics(chain):
    exp_root, out = chain
    steps = reproduce.plan("tiny")
    for step in steps:
        assert os.path.isfile(os.path.join(exp_root, step["name"], "metrics.json")), step["name"]
    assert f"[{len(steps)}/{len(steps)}]" in out.stdout


def test_results_table_has_every_row(chain):
    exp_root, _ = chain
    md = open(os.path.join(exp_root, "results.md")).read()
    teachers = ("original", "possessive (RML)", "Nasty", "RML + Nasty", "Stingy (top-k)", "post-hoc reversal")
    assert [report.TEACHER_NAMES[t] for t in reproduce.battery_teachers()] == list(teachers)
    assert reproduce.battery_attacks() == ["vanilla", "rereverse", "dkd", "tckd", "hardlabel", "markov", "skeptical"]
    for teacher in teachers:
        assert f"| {teacher} |" in md
        for attack in reproduce.battery_attacks():
            assert f"| {teacher} | {attack} |" in md
    assert "Scratch: **" in md and "label smoothing 0.1 (the bar): **" in md and "## Data-free (DFAD)" in md
    assert "Steps without results yet" not in md
    res = read_json(os.path.join(exp_root, "results.json"))
    kd = res["students"]["cnn_small"]["kd"]["rml"]["vanilla"]
    assert (kd["verdict"] in ("inconclusive", "KD-resistant")
            and kd["delta_ls"] is not None)  # one seed: never "distillable"


def test_results_state_the_compute(chain):
    """Every step's wall time, their sum, and the reproduce.py run's own wall time are in results.md/json."""
    exp_root, _ = chain
    res = read_json(os.path.join(exp_root, "results.json"))
    steps = [s["name"] for s in reproduce.plan("tiny")]
    metrics = {name: read_json(os.path.join(exp_root, name, "metrics.json")) for name in steps}
    # a tiny step can round to 0.0 s, so compare with what each step recorded; a battery's student counts its share
    recorded = {name: round(m["wall_time_s"] / len(m.get("battery") or [None]), 1) for name, m in metrics.items()}
    assert res["compute"] == recorded
    assert any(m.get("battery") for m in metrics.values())  # the tiny chain trains its KD students in batteries
    md = open(os.path.join(exp_root, "results.md")).read()
    assert "## Compute" in md and all(f"| {name} |" in md for name in steps)
    assert f"Sum of the step times: **{sum(res['compute'].values()) / 60:.1f} min**" in md
    assert res["extra"]["jobs"] == 1 and "took **" in md and "with `--jobs 1`" in md


def test_stale_sweep_from_an_earlier_config_is_ignored(chain):
    """A folder re-run without a tau sweep keeps the old sweep.json around; the table must not read it."""
    import report
    exp_root, _ = chain
    folder = os.path.join(exp_root, "kd_vanilla_rml_cnn_small")
    acc = read_json(os.path.join(folder, "metrics.json"))["final_acc"]
    stale = os.path.join(folder, "sweep.json")
    with open(stale, "w") as f:
        json.dump({"best_acc": 99.0, "best_tau": 1.0, "final_acc": {"1": 99.0}, "runs": {"1": "tau_1"}}, f)
    try:
        res = report.collect(exp_root)
    finally:
        os.remove(stale)
    assert res["students"]["cnn_small"]["kd"]["rml"]["vanilla"]["acc"] == acc != 99.0


def test_figures_are_pngs(chain):
    exp_root, _ = chain
    for name in ("fig_accuracy.png", "fig_response.png", "fig_curves.png", "fig_frontier.png"):
        with open(os.path.join(exp_root, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def _student_weights(exp_root, attack, teacher):
    """The weights digest of the tiny chain's student of `attack` against `teacher`."""
    return read_json(os.path.join(exp_root, f"kd_{attack}_{teacher}_cnn_small", "metrics.json"))["weights_sha256"]


def test_a_defence_that_keeps_the_originals_argmax_gives_the_hard_label_thief_the_floor_bit_for_bit(chain):
    """Stingy (top-k) and post-hoc reversal change what the teacher says but not its argmax, on any image: the
    hardlabel attack reads the argmax alone, so its student is the hard-label floor's, weight for weight (the p2
    grid's post-hoc row is its floor's to the last bit too). RML's argmax is its own, and so is its student."""
    exp_root, _ = chain
    weights = functools.partial(_student_weights, exp_root, "hardlabel")
    assert weights("stingy") == weights("original") == weights("posthoc")
    assert weights("rml") != weights("original")


def test_rereverse_and_posthoc_reversal_swap_students_bit_for_bit(chain):
    """Re-reversal around the argmax and post-hoc reversal are the same permutation of the non-target logits,
    applied twice the identity: re-reversal from the original trains vanilla KD from post-hoc reversal's student,
    weight for weight, and re-reversal from post-hoc reversal vanilla KD from the original's (the p2 grid's
    seed 0 agrees to the last bit). Against RML, whose order is its own, re-reversal is its own student."""
    exp_root, _ = chain
    weights = functools.partial(_student_weights, exp_root)

    assert weights("rereverse", "original") == weights("vanilla", "posthoc") != weights("vanilla", "original")
    assert weights("rereverse", "posthoc") == weights("vanilla", "original")
    assert weights("rereverse", "rml") not in (weights("vanilla", "rml"), weights("vanilla", "posthoc"))


def test_frontier_names_each_teachers_strongest_attack(chain):
    exp_root, _ = chain
    res = report.collect(exp_root)
    rows = report.frontier(res)
    assert [r["teacher"] for r in rows] == reproduce.battery_teachers()
    for r in rows:
        attacks = res["students"]["cnn_small"]["kd"][r["teacher"]]
        assert r["acc"] == max(a["acc"] for a in attacks.values()) and attacks[r["strongest"]]["acc"] == r["acc"]
        assert r["delta_ls"] == pytest.approx(r["acc"] - res["students"]["cnn_small"]["ls"]["acc"])
        assert r["resists_all"] == all(a["verdict"] == "KD-resistant" for a in attacks.values())
    md = open(os.path.join(exp_root, "results.md")).read()
    assert "## Defences at a glance" in md
    assert read_json(os.path.join(exp_root, "results.json"))["frontier"] == json.loads(json.dumps(rows))


def test_second_run_skips_everything(chain, cifar_root, capsys):
    exp_root, _ = chain
    before = os.path.getmtime(os.path.join(exp_root, "teacher_cnn", "metrics.json"))
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root]) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == len(reproduce.plan("tiny"))
    assert os.path.getmtime(os.path.join(exp_root, "teacher_cnn", "metrics.json")) == before


def test_report_rebuilds_from_folders(chain, tmp_path):
    exp_root, _ = chain
    os.remove(os.path.join(exp_root, "results.md"))
    out = subprocess.run([sys.executable, "report.py", exp_root], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and os.path.isfile(os.path.join(exp_root, "results.md"))
    bad = subprocess.run([sys.executable, "report.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "steps.json not found" in bad.stderr


def _without(src, dst, teacher):
    """A copy of the finished tiny chain without one teacher, the steps that load it and the report: what a run
    stopped before that teacher leaves (a whole chain from nothing would train every other step again too).
    Returns the copy and the names of the removed steps, teacher first."""
    shutil.copytree(src, dst)
    gone = [teacher] + [s["name"] for s in reproduce.plan("tiny") if teacher in reproduce.dependencies(s)]
    for name in gone:
        shutil.rmtree(os.path.join(dst, name))
    for name in ("results.md", "results.json"):
        if os.path.exists(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    return dst, gone


def test_killed_run_completes_on_rerun(chain, tmp_path, cifar_root):
    exp_root, gone = _without(chain[0], str(tmp_path / "tiny"), "nasty_cnn")
    proc = subprocess.Popen(_reproduce(exp_root, cifar_root), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = os.path.join(exp_root, "nasty_cnn", "metrics.json")
    deadline = time.time() + 300
    while not os.path.isfile(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # somewhere inside the next step
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.isfile(first)
    assert not all(os.path.isfile(os.path.join(exp_root, name, "metrics.json")) for name in gone)  # stopped early
    out = subprocess.run(_reproduce(exp_root, cifar_root), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "nasty_cnn: done, skipped" in out.stdout
    for name in gone:
        assert os.path.isfile(os.path.join(exp_root, name, "metrics.json")), name
    assert os.path.isfile(os.path.join(exp_root, "results.md"))


def _as_cloned(src, dst):
    """Copy a preset folder as a fresh clone has it: the small outputs and the released teachers' weights (every
    teacher of the tiny plan), no training checkpoints, no TensorBoard or run logs."""
    released = {s["name"] for s in reproduce.plan("tiny") if s["role"]["kind"] == "teacher"}

    def ignore(folder, names):
        step = os.path.basename(folder)
        return [n for n in names if n in ("tb", "run.log", "last.pth", "best.pth")
                or (n == "weights.pth" and step not in released)]
    shutil.copytree(src, dst, ignore=ignore)
    return dst


def _stamps(exp_root):
    return {step["name"]: os.path.getmtime(os.path.join(exp_root, step["name"], "metrics.json"))
            for step in reproduce.plan("tiny")}


def test_fresh_clone_with_released_teachers_is_all_done(chain, cifar_root, tmp_path, capsys):
    """Metrics and the released teachers, no checkpoints: nothing is stale and nothing trains."""
    exp_root = _as_cloned(chain[0], str(tmp_path / "tiny"))
    before = _stamps(exp_root)
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root]) == 0
    out = capsys.readouterr().out
    assert f"{len(before)} steps: {len(before)} done\n" in out, out
    assert _stamps(exp_root) == before


def test_removed_released_teacher_retrains_it_and_exactly_its_downstream(chain, cifar_root, tmp_path, capsys):
    exp_root = _as_cloned(chain[0], str(tmp_path / "tiny"))
    os.remove(os.path.join(exp_root, "rml_cnn", "weights.pth"))
    downstream = {s["name"] for s in reproduce.plan("tiny") if "rml_cnn/" in s["params"].get("teacher", "")}
    attacks = len(reproduce.battery_attacks())
    assert len(downstream) == attacks + 1  # every attack and DFAD
    before = _stamps(exp_root)
    n, skipped = len(before), len(before) - attacks - 2
    args = ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root]
    assert run_main(reproduce.main, args + ["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"{n} steps: {skipped} done, {attacks + 1} stale, 1 new" in out
    assert "rml_cnn: new (" in out and "weights.pth is missing" in out
    assert out.count("(its teacher (rml_cnn) is to be trained again)") == attacks + 1
    assert run_main(reproduce.main, args) == 0
    after = _stamps(exp_root)
    rerun = {name for name in before if after[name] != before[name]}
    assert rerun == downstream | {"rml_cnn"}
    assert len(before) - len(rerun) == skipped
    new_rml = read_json(os.path.join(exp_root, "rml_cnn", "metrics.json"))["weights_sha256"]
    for name in downstream:
        assert read_json(os.path.join(exp_root, name, "metrics.json"))["inputs"]["teacher"]["weights_sha256"] == new_rml
    capsys.readouterr()
    assert run_main(reproduce.main, args + ["--dry_run"]) == 0
    assert f"{n} steps: {n} done\n" in capsys.readouterr().out


def test_student_of_another_teacher_is_stale(chain, cifar_root, tmp_path, capsys):
    """A finished student whose recorded teacher weights differ from the teacher's now is stale, and says so."""
    exp_root = _as_cloned(chain[0], str(tmp_path / "tiny"))
    path = os.path.join(exp_root, "kd_vanilla_nasty_cnn_small", "metrics.json")
    metrics = read_json(path)
    metrics["inputs"]["teacher"]["weights_sha256"] = "0" * 64
    with open(path, "w") as f:
        json.dump(metrics, f)
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root,
                                     "--dry_run"]) == 0
    out = capsys.readouterr().out
    n = len(reproduce.plan("tiny"))
    assert f"{n} steps: {n - 1} done, 1 stale" in out
    assert "kd_vanilla_nasty_cnn_small: stale (it was trained from teacher weights 000000000000" in out


def test_half_trained_teacher_is_not_done(chain, cifar_root, tmp_path, capsys):
    """The committed metrics.json matches the config and a last.pth exists, but the run that wrote last.pth
    has not finished (no weights file yet): the teacher resumes and nothing downstream counts as done."""
    exp_root = _as_cloned(chain[0], str(tmp_path / "tiny"))
    teacher = os.path.join(exp_root, "teacher_cnn")
    os.remove(os.path.join(teacher, "weights.pth"))
    shutil.copy(os.path.join(chain[0], "teacher_cnn", "last.pth"), os.path.join(teacher, "last.pth"))
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root,
                                     "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "teacher_cnn: resume (" in out
    assert "rml_cnn: stale" in out and "kd_vanilla_original_cnn_small: stale" in out
    assert "scratch_cnn_small: done" in out


def test_parallel_jobs_give_the_same_results(chain, cifar_root, tmp_path):
    """--jobs 2 runs steps side by side in their own processes, a teacher before what loads it, and every step
    ends with the same accuracy as in the one-process run (same seed, same data, same code). The chain's
    students of Nasty, Nasty itself and the two label-trained students are run again, two at a time."""
    exp_root, _ = chain
    par_root, gone = _without(exp_root, str(tmp_path / "tiny"), "nasty_cnn")
    for name in ("scratch_cnn_small", "ls_cnn_small"):  # steps that need no teacher: the other slot's work
        shutil.rmtree(os.path.join(par_root, name))
        gone.append(name)
    out = subprocess.run(_reproduce(par_root, cifar_root) + ["--jobs", "2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "in slot 1" in out.stdout  # two processes did run at once
    lines = out.stdout.splitlines()

    def mentions(line, names):  # a step's folder, as a whole path, in a progress line
        return any(re.search(re.escape(os.path.join(par_root, name)) + r"[,):\s]", line) for name in names)

    nasty_done = next(i for i, line in enumerate(lines) if "finished in" in line and mentions(line, ["nasty_cnn"]))
    loaders = [i for i, line in enumerate(lines) if "running in slot" in line and mentions(line, gone[1:-2])]
    assert loaders and min(loaders) > nasty_done  # Nasty finished before a step that loads it started
    for name in gone:
        assert os.path.isfile(os.path.join(par_root, name, "run.log"))
        one = read_json(os.path.join(exp_root, name, "metrics.json"))
        two = read_json(os.path.join(par_root, name, "metrics.json"))
        assert two["final_acc"] == pytest.approx(one["final_acc"], abs=1e-9), name
    assert os.path.isfile(os.path.join(par_root, "results.md"))


def test_parallel_failure_names_the_step_and_skips_dependents(tmp_path, capsys):
    """A teacher step that fails (here: no dataset under --data_root) stops the steps that load it, and one
    error line names it and its log."""
    exp_root = str(tmp_path / "tiny")
    bad_root = str(tmp_path / "no_cifar_here")
    os.makedirs(bad_root)
    code = run_main(reproduce.main, ["--preset", "tiny", "--data_root", bad_root, "--exp_root", exp_root,
                                     "--jobs", "2"])
    err = capsys.readouterr()
    assert code == 2
    assert "teacher_cnn (exit 2" in err.err
    assert os.path.join("teacher_cnn", "run.log") in err.err
    assert not os.path.exists(os.path.join(exp_root, "rml_cnn", "run.log"))
    assert not os.path.exists(os.path.join(exp_root, "results.md"))


def test_jobs_must_be_positive(cifar_root, tmp_path, capsys):
    code = run_main(reproduce.main, ["--preset", "tiny", "--data_root", cifar_root,
                                     "--exp_root", str(tmp_path / "x"), "--jobs", "0"])
    assert code == 2
    assert "--jobs" in capsys.readouterr().err


def test_preset_rml_settings_override_the_shared_possessive_ones():
    """A preset's "rml" entry (the swept setting) applies to the RML step alone; Nasty keeps the shared ones."""
    steps = {s["name"]: s["params"] for s in reproduce.plan("mini")}
    rml, nasty = steps["rml_resnet20"], steps["nasty_resnet20"]
    assert (rml["lr"], rml["beta"], rml["alpha"]) == (0.01, 0.3, 1.0)
    assert nasty["lr"] == reproduce.PRESETS["mini"]["possessive"]["lr"] and "beta" not in nasty
    assert rml["epochs"] == nasty["epochs"] and rml["init_from_original"] is True


def test_download_fetches_the_dataset_once_before_any_step(cifar_root, tmp_path, monkeypatch):
    """--download fills a missing data_root in the parent process (parallel steps must not race on it)."""
    import shutil
    import utils.data
    calls = []

    def fake_download(dataset, root):
        calls.append(dataset)
        shutil.copytree(os.path.join(cifar_root, "cifar-10-batches-py"), os.path.join(root, "cifar-10-batches-py"))

    monkeypatch.setattr(utils.data, "_download", fake_download)
    data_root = str(tmp_path / "fresh_data")
    code = run_main(reproduce.main, ["--preset", "tiny", "--data_root", data_root, "--exp_root",
                                     str(tmp_path / "x"), "--download", "--only", "teacher_"])
    assert code == 0 and calls == ["cifar10"]
    assert os.path.isfile(os.path.join(str(tmp_path / "x"), "teacher_cnn", "metrics.json"))


def test_failed_download_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    code = run_main(reproduce.main, ["--preset", "tiny", "--data_root", str(tmp_path / "d"), "--exp_root",
                                     str(tmp_path / "x"), "--download"])
    err = capsys.readouterr().err
    assert code == 2 and "download of cifar10" in err and "Traceback" not in err
    assert not os.path.exists(str(tmp_path / "x" / "steps.json"))


def _fake_seed(exp_root, name, seed, acc):
    """A copy of a finished seed-0 step as seed `seed` with a chosen accuracy (report aggregation only)."""
    src, dst = os.path.join(exp_root, name), os.path.join(exp_root, reproduce.seeded(name, seed))
    if src != dst:
        shutil.copytree(src, dst, dirs_exist_ok=True)
    metrics = read_json(os.path.join(dst, "metrics.json"))
    metrics.update(final_acc=acc, seed=seed)
    metrics["config"]["seed"] = seed
    with open(os.path.join(dst, "metrics.json"), "w") as f:
        json.dump(metrics, f)


def test_report_aggregates_one_and_three_seeds(chain, tmp_path):
    exp_root = str(tmp_path / "tiny")
    shutil.copytree(chain[0], exp_root)
    one = report.collect(exp_root)
    kd = one["students"]["cnn_small"]["kd"]["original"]["vanilla"]
    assert one["seeds"] == [0] and kd["n"] == 1 and kd["std"] is None and kd["p"] is None
    text = open(os.path.join(exp_root, "results.md")).read()
    assert f"| original | vanilla | {kd['acc']:.2f} (1) |" in text and "(n=1) |" in text
    # seeds 1 and 2 of every student arm: the label-smoothing bar at 50, 51, 52; vanilla KD from the original
    # at bar + 3 (+-0.1): distillable; tckd from the original at 10, 11, 12: KD-resistant, harmful
    for step in reproduce.plan("tiny"):
        if step["role"]["kind"] == "teacher":
            continue
        for seed in (1, 2):
            _fake_seed(exp_root, step["name"], seed, 40.0 + seed)
    for seed, (ls, vanilla, tckd) in enumerate([(50.0, 53.0, 10.0), (51.0, 54.1, 11.0), (52.0, 54.9, 12.0)]):
        for name, acc in (("ls_cnn_small", ls), ("kd_vanilla_original_cnn_small", vanilla),
                          ("kd_tckd_original_cnn_small", tckd)):
            _fake_seed(exp_root, name, seed, acc)
    manifest = read_json(os.path.join(exp_root, "steps.json"))
    manifest["steps"] = [{k: s[k] for k in ("name", "script", "role")} for s in reproduce.plan("tiny", seeds=[0, 1, 2])]
    with open(os.path.join(exp_root, "steps.json"), "w") as f:
        json.dump(manifest, f)
    assert run_main(report.main, [exp_root]) == 0
    res = read_json(os.path.join(exp_root, "results.json"))
    assert res["seeds"] == [0, 1, 2]
    students = res["students"]["cnn_small"]
    assert students["ls"]["n"] == 3 and students["ls"]["acc"] == pytest.approx(51.0) and students["ls"]["std"] == \
        pytest.approx(1.0)
    vanilla = students["kd"]["original"]["vanilla"]
    assert vanilla["verdict"] == "distillable" and vanilla["p"] < 0.05 and vanilla["n_paired"] == 3
    tckd = students["kd"]["original"]["tckd"]
    assert tckd["verdict"] == "KD-resistant" and tckd["harmful"]
    text = open(os.path.join(exp_root, "results.md")).read()
    assert "label smoothing 0.1 (the bar): **51.00 ± 1.00 (3)**" in text
    assert f"| original | vanilla | {vanilla['acc']:.2f} ± {vanilla['std']:.2f} (3) |" in text
    assert "| KD-resistant, harmful (p below=" in text and "one-sided paired t-test" in text


def test_seeds_flag_trains_only_the_new_seed_and_keeps_the_old(chain, cifar_root, tmp_path, capsys):
    exp_root = str(tmp_path / "tiny")
    shutil.copytree(chain[0], exp_root)
    args = ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root]
    assert "The last `reproduce.py` run took" in open(os.path.join(exp_root, "results.md")).read()
    assert run_main(reproduce.main, args + ["--seeds", "1", "--only", "ls_"]) == 0
    assert read_json(os.path.join(exp_root, "ls_cnn_small_seed1", "metrics.json"))["seed"] == 1
    # a partial run that trained something: the full run's wall time no longer describes the folder
    assert "The last `reproduce.py` run took" not in open(os.path.join(exp_root, "results.md")).read()
    assert not os.path.exists(os.path.join(exp_root, "scratch_cnn_small_seed1"))
    seeds = {s["role"].get("seed", 0) for s in read_json(os.path.join(exp_root, "steps.json"))["steps"]}
    assert seeds == {0, 1}
    capsys.readouterr()
    assert run_main(reproduce.main, args + ["--dry_run"]) == 0  # seed 1 stays the rows that were asked for
    out = capsys.readouterr().out
    assert "ls_cnn_small_seed1: done" in out and "scratch_cnn_small_seed1" not in out
    assert run_main(reproduce.main, args + ["--seeds", "0,1", "--dry_run"]) == 0  # every arm's once asked for
    out = capsys.readouterr().out
    assert "ls_cnn_small_seed1: done" in out and "scratch_cnn_small_seed1: new" in out
    assert run_main(reproduce.main, args + ["--seeds", "x"]) == 2


def _job(name, script="train_kd.py", verb="running", **params):
    base = {"teacher": "teacher_cnn/weights.pth", "seed": 0, "batch_size": 20, "epochs": 1, "dataset": "cifar10"}
    folder = os.path.join("exps", name)
    return {"step": {"name": name, "script": script, "params": dict(base, **params)}, "verb": verb,
            "folder": folder, "head": f"[1/9] {script} {folder}", "argv": ["--save_path", folder, "--data_root", "d"]}


def test_kd_students_of_one_teacher_and_seed_become_one_battery():
    jobs = [_job("teacher_cnn", script="train_scratch.py"), _job("kd_a"), _job("kd_b", seed=1), _job("kd_c"),
            _job("kd_d", teacher="rml_cnn/weights.pth"), _job("kd_e", verb="resuming"),
            _job("kd_f", tau_sweep=[1.0, 4.0]), _job("kd_g", attack="tckd", model="resnet8")]
    merged = reproduce.batteries(jobs)
    names = [reproduce.job_names(j) for j in merged]
    # the teacher first; a, c and g share teacher, seed and data keys (student model and attack may differ)
    assert names == [["teacher_cnn"], ["kd_a", "kd_c", "kd_g"], ["kd_b"], ["kd_d"], ["kd_e"], ["kd_f"]]
    battery = merged[1]
    assert battery["argv"] == ["--battery", "exps/kd_a,exps/kd_c,exps/kd_g", "--data_root", "d"]
    assert reproduce.dependencies(battery["step"]) == {"teacher_cnn"}


def test_a_step_that_starts_alone_gets_every_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert reproduce.job_env(0, 2)["OMP_NUM_THREADS"] == "4"
    assert reproduce.job_env(0, 2, share=1)["OMP_NUM_THREADS"] == "8"
    assert reproduce.job_env(1, 4, share=2)["OMP_NUM_THREADS"] == "4"


def test_mini_default_is_three_seeds(tmp_path, capsys):
    """The mini preset trains every student arm with seeds 0, 1 and 2 unless --seeds says otherwise."""
    argv = ["--preset", "mini", "--dry_run", "--data_root", str(tmp_path), "--exp_root", str(tmp_path / "mini")]
    assert run_main(reproduce.main, argv) == 0
    out = capsys.readouterr().out
    n = len(reproduce.plan("mini", seeds=(0, 1, 2)))
    assert f"{n} steps: {n} new" in out and "kd_tckd_rml_cnn_seed2: new" in out
    assert not os.path.exists(tmp_path / "mini")  # a dry run writes nothing, not even steps.json
    assert run_main(reproduce.main, argv + ["--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "kd_tckd_rml_cnn_seed2" not in out and f"{len(reproduce.plan('mini'))} steps:" in out


def test_amp_flag_sets_the_students_precision_and_keeps_the_teachers(chain, cifar_root, capsys):
    """--amp off trains every student arm and DFAD of every seed in fp32 while the teachers keep the preset's
    precision, so a finished preset's teachers stay done and only its students are trained again."""
    steps = reproduce.plan("mini", seeds=(0, 1), amp="off")
    teachers = [s for s in steps if s["role"]["kind"] == "teacher"]
    students = [s for s in steps if s["role"]["kind"] != "teacher"]
    assert teachers and all("amp" not in s["params"] for s in teachers)
    assert {s["role"]["kind"] for s in students} == {"student", "kd", "dfad"}
    assert all(s["params"]["amp"] == "off" for s in students)
    exp_root, _ = chain  # the tiny preset trains in fp32 already: --amp off is its own setting, --amp bf16 is not
    argv = ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root, "--dry_run"]
    tiny = reproduce.plan("tiny")
    n, n_teachers = len(tiny), sum(s["role"]["kind"] == "teacher" for s in tiny)
    assert run_main(reproduce.main, argv + ["--amp", "off"]) == 0
    assert f"{n} steps: {n} done" in capsys.readouterr().out
    assert run_main(reproduce.main, argv + ["--amp", "bf16"]) == 0
    out = capsys.readouterr().out
    assert f"{n} steps: {n_teachers} done, {n - n_teachers} new" in out
    assert "teacher_cnn: done" in out and "scratch_cnn_small: new" in out


def test_report_treats_a_corrupt_result_as_missing(chain, tmp_path):
    """A half-written metrics.json (a crash, a bad copy) is no result: listed as missing, never a traceback."""
    exp_root = str(tmp_path / "tiny")
    shutil.copytree(chain[0], exp_root, ignore=lambda folder, names: [n for n in names if n in ("tb", "last.pth")])
    with open(os.path.join(exp_root, "ls_cnn_small", "metrics.json"), "w") as f:
        f.write('{"final_acc": 5')
    assert run_main(report.main, [exp_root]) == 0
    assert "ls_cnn_small" in report.collect(exp_root)["missing"]
    assert "Steps without results yet: " in open(os.path.join(exp_root, "results.md")).read()


def test_a_sweep_picked_another_way_shares_its_runs_and_goes_stale_with_them(chain, cifar_root, tmp_path, capsys):
    """A step that picks among another step's sweep (runs_from, as threat_p2's tuned_nll rows do) runs after it,
    trains nothing, and is picked again when those runs change or are to be trained again."""
    from reproduction.jobs import run_plan
    from reproduction.plan import plan, waits_on
    from reproduction.schedules import variant
    teachers_root, _ = chain
    steps = {s["name"]: s for s in plan("tiny")}
    tuned = variant(steps["kd_vanilla_original_cnn_small"], "tuned", tau_sweep=[1, 4], val_split=20)
    del tuned["params"]["tau"]
    picked = variant(tuned, "picked", select_by="val_nll", runs_from="tuned")
    assert waits_on(picked) == {"teacher_cnn", "tuned"} and waits_on(tuned) == {"teacher_cnn"}
    root = str(tmp_path / "exp")
    every = [steps["teacher_cnn"], tuned, picked]

    def plan_run(dry_run=False):
        capsys.readouterr()
        left = run_plan(every, [tuned, picked], root, teachers_root, {"preset": "tiny"}, cifar_root,
                        device=TEST_DEVICE, dry_run=dry_run)
        return left, capsys.readouterr().out

    plan_run()
    assert sorted(os.listdir(os.path.join(root, "picked"))) == ["config.json", "params.json", "sweep.json"]
    sweep = read_json(os.path.join(root, "picked", "sweep.json"))
    assert sweep["runs"] == {"1": os.path.join("..", "tuned", "tau_1"), "4": os.path.join("..", "tuned", "tau_4")}
    assert sweep["config"]["runs_from"] == os.path.join(root, "tuned") and sweep["selected_by"] == "val_nll"
    assert plan_run(dry_run=True)[0] == []
    # a run it picked among changes: it picks again, the sweep stays done
    path = os.path.join(root, "tuned", "tau_4", "metrics.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text + "\n")
    left, out = plan_run(dry_run=True)
    assert [s["name"] for s in left] == ["picked"] and "tau_4/metrics.json, a run it picked among, changed" in out
    with open(path, "w") as f:
        f.write(text)
    assert plan_run(dry_run=True)[0] == []
    # the sweep is to be trained again: so is the pick, after it
    os.remove(os.path.join(root, "tuned", "sweep.json"))
    left, out = plan_run(dry_run=True)
    assert [s["name"] for s in left] == ["tuned", "picked"] and "which it picks among, are to be trained again" in out


def test_a_sweep_split_into_lone_runs_resumes_and_picks_without_training_them_again(chain, cifar_root, tmp_path,
                                                                                    capsys):
    """A sweep's runs trained one by one into its tau_<tau>/ folders (side by side, as README says) make the step
    resume, not start again: the sweep reuses them, trains the rest and picks. A run of another config there is
    not counted (the sweep trains it again itself)."""
    import train_kd
    from reproduction.jobs import run_plan
    from reproduction.plan import plan, resolve_paths
    from reproduction.schedules import variant
    from reproduction.state import split_sweep_runs, step_state
    teachers_root, _ = chain
    steps = {s["name"]: s for s in plan("tiny")}
    tuned = variant(steps["kd_vanilla_original_cnn_small"], "tuned", tau_sweep=[1, 4], val_split=20)
    del tuned["params"]["tau"]
    root = str(tmp_path / "exp")
    params = resolve_paths(tuned, teachers_root, root)
    lone = os.path.join(root, "tuned", "tau_4")
    make_exp(lone, **dict(params, tau=4.0, tau_sweep=[]))
    assert run_main(train_kd.main, ["--save_path", lone, "--data_root", cifar_root, "--device", TEST_DEVICE]) == 0
    before = read_json(os.path.join(lone, "metrics.json"))
    teacher = os.path.join(teachers_root, "teacher_cnn", "weights.pth")
    deps = {"teacher": ("teacher_cnn", read_json(os.path.join(teachers_root, "teacher_cnn", "metrics.json"))[
        "weights_sha256"])}
    assert params["teacher"] == teacher and split_sweep_runs(os.path.join(root, "tuned"), params, deps) == 1
    # another seed, or another teacher's weights, is another run
    assert split_sweep_runs(os.path.join(root, "tuned"), dict(params, seed=params["seed"] + 1), deps) == 0
    assert split_sweep_runs(os.path.join(root, "tuned"), params, {"teacher": ("teacher_cnn", "0" * 64)}) == 0
    state, reason = step_state(os.path.join(root, "tuned"), params, deps)
    assert state == "resume" and "1 of its runs are finished" in reason
    every = [steps["teacher_cnn"], tuned]
    capsys.readouterr()
    run_plan(every, [tuned], root, teachers_root, {"preset": "tiny"}, cifar_root, device=TEST_DEVICE)
    out = capsys.readouterr().out
    assert "tau 4: " in out and "skipped" in out
    assert read_json(os.path.join(lone, "metrics.json")) == before  # not trained again
    sweep = read_json(os.path.join(root, "tuned", "sweep.json"))
    assert sweep["final_acc"]["4"] == before["final_acc"] and set(sweep["final_acc"]) == {"1", "4"}
    assert step_state(os.path.join(root, "tuned"), params, deps) == ("done", None)


def test_a_seed_only_some_rows_hold_stays_theirs_and_is_not_planned_for_every_arm(tmp_path, capsys):
    """Two more seeds of one arm (to settle its verdict) keep that arm's steps in the plan; they do not put every
    other arm's seed 3 into it. A seed asked for with --seeds is every arm's."""
    exp_root = str(tmp_path / "tiny")
    args = ["--preset", "tiny", "--exp_root", exp_root, "--dry_run"]

    def planned(extra=()):
        capsys.readouterr()
        assert run_main(reproduce.main, args + list(extra)) == 0
        return [line.split()[2].rsplit(os.sep, 1)[-1].rstrip(":")
                for line in capsys.readouterr().out.splitlines() if re.match(r"\[\d+/\d+\] ", line)]

    base = planned()
    students = [n for n in base if n.endswith("_small")]
    assert len(students) > 10 and not any(n.endswith("_seed3") for n in base)
    os.makedirs(exp_root)
    extra = {"name": "ls_cnn_small_seed3", "script": "train_scratch.py", "role": {"kind": "ls", "seed": 3}}
    with open(os.path.join(exp_root, "steps.json"), "w") as f:
        json.dump({"preset": "tiny", "steps": [extra]}, f)
    assert planned() == base + ["ls_cnn_small_seed3"]
    asked = planned(["--seeds", "0,3"])  # asked for: every arm's
    assert sorted(n for n in asked if n.endswith("_seed3")) == sorted(n + "_seed3" for n in students)


def test_a_seed_asked_for_with_only_joins_the_plan_for_the_named_rows_alone(tmp_path):
    """`--seeds 0,3 --only ls_` plans seed 3 for the label-smoothing rows alone: the other arms' seed 3 do not enter
    the plan, so neither steps.json (which later runs read and keep) nor the report lists them; without --only a
    seed asked for is every arm's."""
    exp_root = str(tmp_path / "tiny")

    def plan_of(*extra):
        args = reproduce.build_parser().parse_args(["--preset", "tiny", "--exp_root", exp_root, *extra])
        steps, selected, *_ = reproduce.preset_steps(args)
        return [s["name"] for s in steps], [s["name"] for s in selected]

    names, selected = plan_of("--seeds", "0,3", "--only", "ls_")
    seed3 = [n for n in names if n.endswith("_seed3")]
    assert seed3 and all(n.startswith("ls_") for n in seed3)
    assert set(seed3) <= set(selected)
    assert len([n for n in names if not n.endswith("_seed3")]) > 10  # seed 0's every arm stays in the plan
    every, _ = plan_of("--seeds", "0,3")
    assert len([n for n in every if n.endswith("_seed3")]) > len(seed3) + 5
