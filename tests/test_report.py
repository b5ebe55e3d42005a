"""The report's pieces on small run folders written here (no training): collect's seeds, sweeps and verdicts, the
bar of a threat model, provenance, the cells and sections of results.md, and the figures."""
import json
import os

import pytest

import report
from conftest import read_json, run_main
from reporting.cells import count, fmt, provenance_mark, seeded, tau_cell, verdict_cell
from reporting.collect import collect
from reporting.figures import curves_figure, figures
from reporting.tables import markdown
from reporting.verdicts import bar_of, paired_delta, strongest


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _preset(root, runs, threat=None):
    """A preset folder: steps.json naming every run, and each run's metrics.json. runs: [(name, role, metrics)];
    a teacher's weights digest is 'sha-<name>', and a defended teacher, a KD or a DFAD run records the digest of
    the step it loads."""
    steps = [{"name": name, "role": role} for name, role, _ in runs]
    manifest = {"preset": "toy", "steps": steps}
    if threat:
        manifest["threat"] = threat
    _write(os.path.join(root, "steps.json"), manifest)
    teacher_steps = {role["teacher"]: name for name, role, _ in runs if role["kind"] == "teacher"}
    for name, role, m in runs:
        if m is None:  # a step without results yet
            continue
        m = dict({"seed": role.get("seed", 0), "wall_time_s": 60.0,
                  "history": [{"epoch": 1, "test_acc": m["final_acc"]}]}, **m)
        if role["kind"] == "teacher":
            m.setdefault("weights_sha256", f"sha-{name}")
        if role["kind"] == "teacher" and role["teacher"] != "original":
            m.setdefault("inputs", {"original": {"weights_sha256": f"sha-{teacher_steps['original']}"}})
        if role["kind"] in ("kd", "dfad"):
            m.setdefault("inputs", {"teacher": {"weights_sha256": f"sha-{teacher_steps[role['teacher']]}"}})
        _write(os.path.join(root, name, "metrics.json"), m)
    return root


def _teacher(name, acc):
    return (f"teacher_{name}", {"kind": "teacher", "teacher": name}, {"final_acc": acc})


def _student(source, seed, acc, arch="cnn", **metrics):
    return (f"{source}_{arch}_s{seed}", {"kind": "student", "arch": arch, "source": source, "seed": seed},
            dict({"final_acc": acc}, **metrics))


def _kd(teacher, attack, seed, acc, arch="cnn", **metrics):
    return (f"kd_{attack}_{teacher}_{arch}_s{seed}",
            {"kind": "kd", "arch": arch, "teacher": teacher, "attack": attack, "seed": seed},
            dict({"final_acc": acc, "tau": 4.0}, **metrics))


BAR = {0: 65.0, 1: 65.5, 2: 65.2}


@pytest.fixture
def preset(tmp_path):
    """Three seeds: the original, a Nasty teacher, scratch and label smoothing, vanilla KD clearly above the bar
    from the original and below it from Nasty; one step never ran."""
    runs = [_teacher("original", 90.0), _teacher("nasty", 89.6)]
    for seed, bar in BAR.items():
        runs += [_student("scratch", seed, bar - 0.4), _student("ls", seed, bar),
                 _kd("original", "vanilla", seed, bar + 3.0 + 0.1 * seed),
                 _kd("nasty", "vanilla", seed, bar - 2.0 - 0.1 * seed)]
    runs.append(("kd_tckd_nasty_cnn_s0", {"kind": "kd", "arch": "cnn", "teacher": "nasty", "attack": "tckd",
                                          "seed": 0}, None))
    return _preset(str(tmp_path / "toy"), runs)


def test_collect_gives_every_arm_its_seeds_mean_and_verdict_against_the_bar(preset):
    res = collect(preset)
    assert res["seeds"] == [0, 1, 2] and res["missing"] == ["kd_tckd_nasty_cnn_s0"]
    assert res["teachers"]["nasty"]["delta"] == pytest.approx(-0.4) and res["teachers"]["original"]["delta"] == 0
    s = res["students"]["cnn"]
    assert s["ls"]["accs"] == BAR and s["ls"]["n"] == 3 and s["ls"]["acc"] == pytest.approx(65.2333, abs=1e-4)
    up, down = s["kd"]["original"]["vanilla"], s["kd"]["nasty"]["vanilla"]
    assert (up["accs"] == {0: 68.0, 1: 68.6, 2: 68.4}
            and up["folders"] == [f"kd_vanilla_original_cnn_s{i}" for i in range(3)])
    assert up["delta_ls"] == pytest.approx(3.1) and up["delta_scratch"] == pytest.approx(3.5)
    assert up["verdict"] == "distillable" and up["p"] < 0.05 and up["n_paired"] == 3
    assert down["verdict"] == "KD-resistant" and down["harmful"]
    assert up["provenance"] == down["provenance"] == "ok"
    assert res["compute"]["teacher_original"] == 60.0
    # the frontier: each teacher's strongest attack against the bar
    front = {r["teacher"]: r for r in res["frontier"]}
    assert front["nasty"]["strongest"] == "vanilla" and front["nasty"]["resists_all"]
    assert front["nasty"]["attacks_few_seeds"] == 0  # its one attack on three seeds; tckd never ran
    assert not front["original"]["resists_all"] and front["original"]["bar"] == s["ls"]["acc"]


def test_a_teacher_that_resists_an_attack_run_on_one_seed_says_so(tmp_path):
    runs = [_teacher("original", 90.0), _teacher("nasty", 89.6)]
    for seed, bar in BAR.items():
        runs += [_student("ls", seed, bar), _kd("nasty", "vanilla", seed, bar - 2.0)]
    runs.append(_kd("nasty", "tckd", 0, BAR[0] - 1.0))
    res = collect(_preset(str(tmp_path / "few"), runs))
    front = {r["teacher"]: r for r in res["frontier"]}["nasty"]
    assert front["resists_all"] and front["attacks"] == 2 and front["attacks_few_seeds"] == 1
    assert "| yes (2 attacks, 1 on fewer than 3 seeds) |" in markdown(res)


def test_an_attack_on_three_seeds_paired_with_the_bar_on_two_counts_as_judged_on_two(tmp_path):
    """The verdict pairs seeds: an attack whose three seeds meet a bar that holds two was tested on two."""
    runs = [_teacher("original", 90.0), _teacher("nasty", 89.6)]
    runs += [_student("ls", seed, BAR[seed]) for seed in (0, 1)]
    runs += [_kd("nasty", "vanilla", seed, BAR[seed] - 2.0) for seed in BAR]
    res = collect(_preset(str(tmp_path / "paired"), runs))
    assert res["students"]["cnn"]["kd"]["nasty"]["vanilla"]["n"] == 3
    front = {r["teacher"]: r for r in res["frontier"]}["nasty"]
    assert front["resists_all"] and front["attacks_few_seeds"] == 1


def test_one_seed_is_inconclusive_above_the_bar_and_its_cell_says_so(tmp_path):
    root = _preset(str(tmp_path / "one"), [_teacher("original", 90.0), _student("ls", 0, 65.0),
                                           _kd("original", "vanilla", 0, 66.0)])
    a = collect(root)["students"]["cnn"]["kd"]["original"]["vanilla"]
    assert a["verdict"] == "inconclusive" and a["p"] is None and a["std"] is None
    assert verdict_cell(a) == "inconclusive (n=1)" and seeded(a) == "66.00 (1)"
    assert a["delta_scratch"] is None  # no scratch student: no Δ, not an error
    assert "| original | vanilla | 66.00 (1) | 4 | – | +1.00 | inconclusive (n=1) |" in markdown(collect(root))
    assert "KD rows: at the temperature in the τ column (no sweep)." in markdown(collect(root))


def test_a_tau_sweep_counts_at_the_thiefs_best_temperature_and_every_temperatures_time(tmp_path):
    root = _preset(str(tmp_path / "sweep"), [_teacher("original", 90.0), _student("ls", 0, 65.0)])
    name = "kd_vanilla_original_cnn"
    manifest = read_json(os.path.join(root, "steps.json"))
    manifest["steps"].append({"name": name, "role": {"kind": "kd", "arch": "cnn", "teacher": "original",
                                                     "attack": "vanilla", "seed": 0}})
    _write(os.path.join(root, "steps.json"), manifest)
    folder = os.path.join(root, name)
    _write(os.path.join(folder, "params.json"), {"tau_sweep": [1, 4]})
    _write(os.path.join(folder, "sweep.json"), {"runs": {"1.0": "tau_1", "4.0": "tau_4"}, "best_tau": 4.0,
                                                "best_acc": 67.0, "final_acc": {"1.0": 66.0, "4.0": 67.0}})
    inputs = {"teacher": {"weights_sha256": "sha-teacher_original"}}
    for sub, acc, secs in (("tau_1", 66.0, 30.0), ("tau_4", 67.0, 45.0)):
        _write(os.path.join(folder, sub, "metrics.json"), {"final_acc": acc, "wall_time_s": secs, "inputs": inputs,
                                                           "config": {"tau": float(sub[4:])}})
    res = collect(root)
    a = res["students"]["cnn"]["kd"]["original"]["vanilla"]
    assert (a["acc"], a["tau"], a["per_tau"]) == (67.0, 4.0, {"1.0": 66.0, "4.0": 67.0})
    assert res["compute"][name] == 75.0 and a["provenance"] == "ok"
    assert "KD rows: the thief's best temperature, picked on the test split (an upper bound" in markdown(res)
    # the same sweep picked on the thief's own held-out images: the header says so, the τ cell is marked
    sweep = dict(read_json(os.path.join(folder, "sweep.json")), selected_on="val", val_images=500)
    _write(os.path.join(folder, "sweep.json"), sweep)
    text = markdown(collect(root))
    assert "test split (an upper bound for the attack)" not in text and "| 4 (val 500) |" in text
    assert "one marked (val N) is the thief's own pick, made on N of its training images held out." in text


def test_a_sweep_picked_two_ways_counts_its_runs_time_once(tmp_path):
    import shutil
    root = _preset(str(tmp_path / "two"), [_teacher("original", 90.0), _student("ls", 0, 65.0)])
    manifest = read_json(os.path.join(root, "steps.json"))
    inputs = {"teacher": {"weights_sha256": "sha-teacher_original"}}
    for name, attack, picked in (("kd_tuned_original_cnn", "tuned", "val_acc"),
                                 ("kd_tunednll_original_cnn", "tuned_nll", "val_nll")):
        manifest["steps"].append({"name": name, "role": {"kind": "kd", "arch": "cnn", "teacher": "original",
                                                         "attack": attack, "seed": 0}})
        folder = os.path.join(root, name)
        _write(os.path.join(folder, "params.json"), {"tau_sweep": [1, 4], "val_split": 10, "select_by": picked})
        best = 4.0 if picked == "val_acc" else 1.0
        _write(os.path.join(folder, "sweep.json"), {
            "runs": {"1.0": "tau_1", "4.0": "tau_4"}, "best_tau": best, "best_acc": 66.0 if best == 1.0 else 67.0,
            "final_acc": {"1.0": 66.0, "4.0": 67.0}, "selected_on": "val", "selected_by": picked, "val_images": 10})
        if picked == "val_acc":
            for sub, acc, secs in (("tau_1", 66.0, 30.0), ("tau_4", 67.0, 45.0)):
                _write(os.path.join(folder, sub, "metrics.json"), {"final_acc": acc, "wall_time_s": secs,
                                                                   "inputs": inputs, "config": {"tau": float(sub[4:])}})
        else:  # the same runs, copied
            for sub in ("tau_1", "tau_4"):
                shutil.copytree(os.path.join(root, "kd_tuned_original_cnn", sub), os.path.join(folder, sub))
    _write(os.path.join(root, "steps.json"), manifest)
    res = collect(root)
    assert res["compute"]["kd_tuned_original_cnn"] == 75.0 and res["compute"]["kd_tunednll_original_cnn"] is None
    assert res["shared_runs"] == {"kd_tunednll_original_cnn": "kd_tuned_original_cnn"}
    kd = res["students"]["cnn"]["kd"]["original"]
    assert kd["tuned"]["acc"] == 67.0 and kd["tuned_nll"]["acc"] == 66.0  # each step keeps its own pick
    text = markdown(res)
    assert "| kd_tunednll_original_cnn | – (the runs of kd_tuned_original_cnn) |" in text
    assert "1 (val 10, by cross-entropy)" in text and "| 4 (val 10) |" in text
    # a run trained again (other bytes in its metrics.json) is its own compute
    _write(os.path.join(root, "kd_tunednll_original_cnn", "tau_4", "metrics.json"),
           {"final_acc": 67.0, "wall_time_s": 44.0, "inputs": inputs, "config": {"tau": 4.0}})
    res = collect(root)
    assert res["compute"]["kd_tunednll_original_cnn"] == 74.0 and not res.get("shared_runs")


def test_the_tau_cell_shows_each_seeds_pick_where_the_seeds_picked_differently(tmp_path):
    runs = [_teacher("original", 90.0)] + [_student("ls", s, 65.0 + s / 10) for s in range(3)]
    runs += [_kd("original", "vanilla", s, 66.0 + s, tau=tau) for s, tau in ((0, 1.0), (1, 1.0), (2, 4.0))]
    runs += [_kd("original", "tckd", s, 66.0 + s) for s in range(3)]  # every seed at τ 4
    res = collect(_preset(str(tmp_path / "picks"), runs))
    kd = res["students"]["cnn"]["kd"]["original"]
    assert kd["vanilla"]["taus"] == {0: 1.0, 1: 1.0, 2: 4.0} and tau_cell(kd["vanilla"]) == "1 / 1 / 4"
    assert tau_cell(kd["tckd"]) == "4"
    # hard-label KD reads the argmax alone: whatever τ its run recorded, it has none to show
    assert tau_cell({"tau": 4.0}, "hardlabel") == "–" and tau_cell({"tau": 4.0}, "vanilla") == "4"
    assert "| original | vanilla | 67.00 ± 1.00 (3) | 1 / 1 / 4 |" in markdown(res)
    # a thief's own picks say so once; α is shown per seed as well where it was swept and the picks differ
    picked = dict(kd["vanilla"], chosen={"alpha": 0.5, "val_images": 500}, alphas={0: 0.5, 1: 0.9, 2: 0.5})
    assert tau_cell(picked) == "1 / 1 / 4, α 0.5 / 0.9 / 0.5 (val 500)"
    same = dict(picked, taus={0: 4.0, 1: 4.0, 2: 4.0}, tau=4.0, alphas={0: 0.5, 1: 0.5, 2: 0.5})
    assert tau_cell(same) == "4, α 0.5 (val 500)"


def test_without_labels_the_hard_label_floor_is_the_bar_and_is_not_judged(tmp_path):
    threat = {"name": "p10nl", "title": "5,000 images, no labels", "images": 5000, "labels": False,
              "bar": "hardlabel"}
    runs = [_teacher("original", 90.0), _teacher("nasty", 89.6)]
    for seed in range(3):
        runs += [_student("ls", seed, 60.0 + seed), _kd("original", "hardlabel", seed, 55.0 + 0.2 * seed),
                 _kd("nasty", "vanilla", seed, 58.0 + 0.1 * seed)]
    res = collect(_preset(str(tmp_path / "p10nl"), runs, threat=threat))
    s = res["students"]["cnn"]
    floor, nasty = s["kd"]["original"]["hardlabel"], s["kd"]["nasty"]["vanilla"]
    assert bar_of(res, s) is floor and floor["verdict"] is None and floor["n_paired"] == 0
    assert nasty["verdict"] == "distillable" and nasty["delta_floor"] == pytest.approx(2.9)
    assert nasty["delta_ls"] == pytest.approx(-2.9)  # below label smoothing, yet above this threat model's bar
    text = markdown(res)
    assert "Threat model `p10nl`: 5,000 images, no labels.** Every student arm holds the same 5000 images" in text
    assert "hard-label floor (the bar): **55.20 ± 0.20 (3)**" in text
    assert "| original | hardlabel | 55.20 ± 0.20 (3) | – | -5.80 | +0.00 | the bar |" in text
    assert "or below the bar, the hard-label floor (KD on the original's argmax alone)" in text
    # the floor is the bar, not an attack on the original: the frontier ranks no attack there yet
    front = {r["teacher"]: r for r in res["frontier"]}
    assert "original" not in front and front["nasty"]["attacks"] == 1 and front["nasty"]["strongest"] == "vanilla"
    runs += [_kd("original", "vanilla", seed, 59.0 + 0.1 * seed) for seed in range(3)]
    original = {r["teacher"]: r for r in collect(_preset(str(tmp_path / "more"), runs, threat=threat))["frontier"]}[
        "original"]
    assert (original["strongest"], original["attacks"], original["verdict"]) == ("vanilla", 1, "distillable")


def test_one_precision_is_one_line_and_no_row_is_marked(preset):
    text = markdown(collect(preset))
    assert "Precision: every student run in fp32 (12 runs); the teachers: fp32 (2 runs)." in text
    assert "[fp32]" not in text and "[bf16]" not in text and "mixed" not in text


@pytest.mark.parametrize("threat", [None, {"name": "p10nl", "title": "5,000 images, no labels", "images": 5000,
                                           "labels": False, "bar": "hardlabel"}])
def test_a_row_in_another_precision_than_its_bar_is_marked(tmp_path, threat):
    """A grid whose rows came from two machines: the verdicts of the fp32 rows against a bf16 bar are flagged,
    and the rows that share the bar's precision are not."""
    bf16 = {"amp": "bfloat16"}
    runs = [_teacher("original", 90.0), _teacher("nasty", 89.6)]
    for seed in range(3):
        runs += [_student("ls", seed, 60.0 + seed, **bf16), _kd("original", "hardlabel", seed, 55.0, **bf16),
                 _kd("nasty", "vanilla", seed, 58.0 + 0.1 * seed, **bf16),
                 _kd("nasty", "tckd", seed, 58.5, **({} if seed else bf16))]
    res = collect(_preset(str(tmp_path / "mixed"), runs, threat=threat))
    s = res["students"]["cnn"]
    assert s["kd"]["nasty"]["tckd"]["precision"] == ["bf16", "fp32"] and s["ls"]["precision"] == ["bf16"]
    text = markdown(res)
    assert "Precision: **mixed**, the students in bf16 (10 runs), fp32 (2 runs); the teachers: fp32 (2 runs)." in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| Nasty | ")}
    assert "58.50 ± 0.00 (3) [bf16/fp32] |" in rows["tckd"] and "[" not in rows["vanilla"].split(" | ")[2]
    # the frontier table carries the mark of the strongest attack's row it shows
    glance = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| `cnn` | ")}
    assert "| tckd | 58.50 ± 0.00 (3) [bf16/fp32] |" in glance["Nasty"]
    # with labels the original's hard-label student is an attack; without, it is the bar and not on the frontier
    assert "original" not in glance if threat else "[" not in glance["original"]


def test_a_student_trained_from_other_weights_is_marked_and_refused_with_strict(tmp_path, capsys):
    runs = [_teacher("original", 90.0), _student("ls", 0, 65.0),
            _kd("original", "vanilla", 0, 66.0, inputs={"teacher": {"weights_sha256": "f" * 64}}),
            _kd("original", "dkd", 0, 60.0, inputs={})]
    root = _preset(str(tmp_path / "bad"), runs)
    res = collect(root)
    kd = res["students"]["cnn"]["kd"]["original"]
    assert (kd["vanilla"]["provenance"], kd["dkd"]["provenance"]) == ("mismatch", "unrecorded")
    assert provenance_mark(kd["vanilla"]) == " ✗" and provenance_mark(kd["dkd"]) == " ?"
    why = res["provenance"]["kd_vanilla_original_cnn_s0"]["why"]
    assert why == "trained from teacher weights ffffffffffff, but teacher_original in this folder produced sha-teacher_"
    text = markdown(res)
    assert "| original | vanilla | 66.00 (1) ✗ |" in text and "- `kd_dkd_original_cnn_s0`: unrecorded:" in text
    assert run_main(report.main, [root, "--strict"]) == 2
    assert "re-run reproduce.py on this folder" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(root, "results.md"))  # refused before anything is written


def test_a_delta_is_taken_over_the_seeds_both_arms_hold():
    bar = {"acc": 55.0, "accs": {0: 55.0, 1: 53.0, 2: 57.0}}
    # one seed against the bar's three: against the bar's seed 2, not against its mean
    assert paired_delta({"acc": 59.5, "accs": {2: 59.5}}, bar) == pytest.approx(2.5)
    # the same seeds: the difference of the means
    assert paired_delta({"acc": 58.0, "accs": {0: 58.0, 1: 56.0, 2: 60.0}}, bar) == pytest.approx(3.0)
    # no seed in common: the difference of the means; no bar: none
    assert paired_delta({"acc": 50.0, "accs": {7: 50.0}}, bar) == pytest.approx(-5.0)
    assert paired_delta({"acc": 50.0, "accs": {0: 50.0}}, {}) is None and paired_delta({"acc": 50.0}, None) is None


def test_the_strongest_attack_is_ranked_by_its_paired_delta_not_by_a_mean_over_fewer_seeds():
    # seed 2's images are the easy draw (the bar is 57 there): dkd run on it alone has the highest mean, but on
    # its one seed it beats the bar by 2.5, where vanilla beats it by 3 on each of the three
    bar = {"acc": 55.0, "accs": {0: 55.0, 1: 53.0, 2: 57.0}}
    attacks = {"vanilla": {"acc": 58.0, "accs": {0: 58.0, 1: 56.0, 2: 60.0}, "verdict": "distillable"},
               "dkd": {"acc": 59.5, "accs": {2: 59.5}, "verdict": "inconclusive"}}
    deltas = {a: paired_delta(r, bar) for a, r in attacks.items()}
    assert deltas == pytest.approx({"vanilla": 3.0, "dkd": 2.5})
    assert strongest(attacks, "acc", deltas) == ("vanilla", False)
    assert strongest(attacks, "acc") == ("dkd", False)  # without the bar: by mean accuracy
    assert strongest(attacks, "acc", {"vanilla": 3.0, "dkd": None})[0] == "dkd"  # a Δ missing: by mean too
    attacks["tckd"] = {"acc": 50.0, "accs": {7: 50.0}, "verdict": "KD-resistant"}
    assert strongest(attacks, "acc", {a: paired_delta(r, bar) for a, r in attacks.items()}) == ("vanilla", False)


def test_cells_read_as_the_table_prints_them():
    assert (fmt(None) == "–" and fmt(1.234) == "1.23" and fmt(1.0, signed=True) == "+1.00"
            and fmt(0.5, "{:g}") == "0.5")
    assert seeded(None) == "–" and seeded({"acc": None}) == "–"
    assert seeded({"acc": 65.123, "std": 0.456, "n": 3}) == "65.12 ± 0.46 (3)"
    assert verdict_cell({}) == "–"
    # two seeds: the p shows, and the cell says it decides nothing
    assert verdict_cell({"verdict": "inconclusive", "harmful": False, "p": 0.0397, "n_paired": 2}) == \
        "inconclusive (n=2 < 3, p=0.0397)"
    # at or below the bar the cell gives the p of 'below', the test that decides 'harmful'
    assert verdict_cell({"verdict": "KD-resistant", "harmful": True, "p": 0.98766, "n_paired": 3}) == \
        "KD-resistant, harmful (p below=0.0123)"
    assert verdict_cell({"verdict": "KD-resistant", "harmful": False, "p": 0.75, "n_paired": 2}) == \
        "KD-resistant (n=2 < 3, p below=0.25)"


def test_a_harmful_rows_cell_gives_the_p_that_made_it_harmful():
    from utils.stats import verdict
    test = verdict({0: 60.0, 1: 61.0, 2: 59.5}, {0: 65.0, 1: 65.5, 2: 65.2})
    assert test["harmful"] and test["p_less"] < 0.05
    cell = verdict_cell({**test, "n_paired": test["n"]})
    assert cell == f"KD-resistant, harmful (p below={test['p_less']:.3g})"
    up = verdict({0: 66.0, 1: 67.0, 2: 66.5}, {0: 65.0, 1: 65.5, 2: 65.2})
    assert verdict_cell({**up, "n_paired": up["n"]}) == f"distillable (p={up['p']:.3g})"


def test_resistance_line_tells_too_few_seeds_from_no_significance():
    from reporting.tables import _resistance_lines

    def arm(word, n):
        return {"verdict": word, "n_paired": n}

    res = {"teachers": {}, "dfad": {}, "students": {"cnn": {"kd": {"nasty": {
        "vanilla": arm("inconclusive", 2), "dkd": arm("inconclusive", 3), "tckd": arm("KD-resistant", 2)}}}}}
    assert _resistance_lines(res) == [
        "- Nasty → `cnn`: above the bar on fewer than 3 seeds (inconclusive) with vanilla; above the bar but not "
        "significantly (inconclusive) with dkd; resists tckd."]


def test_resistance_line_counts_its_attacks_in_the_right_number():
    from reporting.tables import _resistance_lines
    assert (count(1, "attack"), count(2, "attack"), count(0, "seed")) == ("1 attack", "2 attacks", "0 seeds")
    two = {"vanilla": {"verdict": "KD-resistant", "n_paired": 3}, "tckd": {"verdict": "KD-resistant", "n_paired": 3}}
    res = {"teachers": {}, "dfad": {}, "students": {"cnn": {"kd": {"nasty": two}}}}
    assert _resistance_lines(res) == ["- Nasty → `cnn`: **KD-resistant** against all 2 attacks (vanilla, tckd)."]
    # the self-tuning thief's two selection rules are two rows but one attack
    rules = {"tuned": two["vanilla"], "tuned_nll": two["tckd"]}
    res["students"]["cnn"]["kd"]["nasty"] = {**two, **rules}
    assert _resistance_lines(res) == [
        "- Nasty → `cnn`: **KD-resistant** against all 3 attacks (vanilla, tckd, tuned, tuned_nll)."]
    res["students"]["cnn"]["kd"]["nasty"] = rules
    assert _resistance_lines(res) == ["- Nasty → `cnn`: **KD-resistant** against 1 attack (tuned, tuned_nll)."]


def test_results_md_sections(preset):
    res = collect(preset)
    text = markdown(res, {"reproduce_wall_time_s": 600.0, "jobs": 2})
    assert text.startswith("# Results: preset `toy`\n") and "over seeds 0, 1, 2." in text
    assert "| Nasty | 89.60 | -0.40 |" in text
    assert ("| Nasty | vanilla | 63.13 ± 0.23 (3) | 4 | -1.70 | -2.10 | KD-resistant, harmful (p below=0.000378) |"
            in text)
    assert "- Nasty → `cnn`: **KD-resistant** against 1 attack (vanilla)." in text
    assert "- original → `cnn`: **distillable** by vanilla." in text
    assert "Steps without results yet: kd_tckd_nasty_cnn_s0." in text
    assert "Every one of the 7 runs that load a teacher recorded the sha256" in text
    assert "| teacher_original | 1.0 |" in text and "with `--jobs 2`" in text and "**10.0 min**" in text
    assert "## Data-free (DFAD)" not in text  # no DFAD run, no section


def test_figures_draw_what_the_folder_holds(preset, tmp_path):
    res = collect(preset)
    out = str(tmp_path / "figs")
    os.makedirs(out)
    drawn = figures(res, out)
    assert drawn == ["fig_accuracy.png", "fig_curves.png", "fig_frontier.png"]  # no teacher recorded a response
    for name in drawn:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    labels, values, _ = report.accuracy_bars(res)
    assert labels[:2] == ["teacher\noriginal", "teacher\nNasty"] and len(values) == 2 + 2 + 2


def test_the_curves_of_runs_evaluated_every_few_epochs_are_drawn(tmp_path):
    """The threat models' students evaluate every eval_every epochs: the epochs between have no test accuracy."""
    history = [dict({"epoch": e, "train_acc": 50.0 + e}, **({"test_acc": 40.0 + e} if e % 10 == 0 else {}))
               for e in range(1, 31)]
    runs = [_teacher("original", 90.0), _student("ls", 0, 60.0, history=history),
            _kd("original", "vanilla", 0, 62.0, history=history)]
    res = collect(_preset(str(tmp_path / "p10"), runs))
    assert curves_figure(res, str(tmp_path / "fig_curves.png"))
    assert os.path.getsize(tmp_path / "fig_curves.png") > 0
    only_train = [{"epoch": 1, "train_acc": 10.0}]
    for arm in (res["students"]["cnn"]["ls"], res["students"]["cnn"]["kd"]["original"]["vanilla"],
                res["teachers"]["original"]):
        arm["history"] = only_train
    assert not curves_figure(res, str(tmp_path / "none.png"))  # nothing evaluated: no figure


def test_build_keeps_what_reproduce_recorded_and_drops_the_histories(preset):
    report.build(preset, extra={"jobs": 2})
    report.build(preset)  # a rebuild without extra keeps the recorded one
    saved = read_json(os.path.join(preset, "results.json"))
    assert saved["extra"] == {"jobs": 2}
    assert "history" not in saved["teachers"]["nasty"] and "history" not in saved["students"]["cnn"]["ls"]
    assert saved["students"]["cnn"]["kd"]["nasty"]["vanilla"]["verdict"] == "KD-resistant"
    with open(os.path.join(preset, "results.md")) as f:
        assert f.read() == markdown(collect(preset), {"jobs": 2})


def test_comparison_marks_the_verdicts_that_differ(preset, tmp_path):
    other = _preset(str(tmp_path / "ref"), [_teacher("original", 90.5), _student("ls", 0, 65.0),
                                            _kd("original", "vanilla", 0, 64.0), _kd("original", "dkd", 0, 60.0)])
    text = report.comparison(collect(preset), collect(other), "runs/toy", "exps/toy")
    assert text.startswith("# `runs/toy` against `exps/toy`\n")
    assert "| teacher original | 90.00 | 90.50 | -0.50 | – | – |" in text
    assert "| cnn KD original / vanilla | 68.33 | 64.00 | +4.33 | distillable | KD-resistant **≠** |" in text
    assert "3 rows in both: mean |Δ| 1.69, largest 4.33 (cnn KD original / vanilla); 1 verdict(s) differ" in text
    assert "Rows only in the reference: cnn KD original / dkd." in text


def test_an_arms_first_seed_stands_for_it_whatever_the_order_of_the_steps(tmp_path):
    runs = [_teacher("original", 90.0), _student("ls", 1, 66.0), _student("ls", 0, 65.0), _student("ls", 2, 64.0)]
    ls = collect(_preset(str(tmp_path / "order"), runs))["students"]["cnn"]["ls"]
    assert ls["folder"] == "ls_cnn_s0" and ls["history"] == [{"epoch": 1, "test_acc": 65.0}]
    assert ls["folders"] == ["ls_cnn_s1", "ls_cnn_s0", "ls_cnn_s2"] and (ls["acc"], ls["std"]) == (65.0, 1.0)
