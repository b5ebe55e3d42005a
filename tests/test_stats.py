"""The verdict rule of METHOD.md section 8 on hand-made numbers, and the t distribution it rests on."""
import math

import pytest

from utils.stats import betainc, mean_std, paired_t, t_sf, verdict


def test_t_distribution_against_known_values():
    assert t_sf(1.0, 1) == pytest.approx(0.25, abs=1e-12)  # Cauchy: 1/2 - atan(1)/pi
    assert t_sf(0.0, 5) == pytest.approx(0.5, abs=1e-12)
    assert t_sf(2.919986, 2) == pytest.approx(0.05, abs=1e-5)  # the n = 3 critical value of section 8
    assert t_sf(2.131847, 4) == pytest.approx(0.05, abs=1e-5)
    assert t_sf(1.812461, 10) == pytest.approx(0.05, abs=1e-5)
    assert t_sf(-2.919986, 2) == pytest.approx(0.95, abs=1e-5)
    for df in (1, 2, 7):  # df=2 has a closed form: 1/2 - t / (2 sqrt(t^2 + 2))
        for t in (0.3, 1.7, 4.0):
            if df == 2:
                assert t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
            assert t_sf(t, df) + t_sf(-t, df) == pytest.approx(1.0, abs=1e-12)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-4)  # I_0.4(2,3) = 1 - 0.6^4 - 4*0.4*0.6^3


def test_mean_std_and_paired_t():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, None) and mean_std([]) == (None, None)
    t, p, p_less = paired_t([3.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # differences 2, 2, 3: mean 7/3, sd 0.577
    assert t == pytest.approx((7 / 3) / (math.sqrt(1 / 3) / math.sqrt(3)))
    assert p == pytest.approx(t_sf(t, 2)) and p + p_less == pytest.approx(1.0)
    assert paired_t([1.0], [0.0]) == (None, None, None)
    assert paired_t([2.0, 3.0], [1.0, 2.0])[:2] == (math.inf, 0.0)


def test_each_outcome_of_the_verdict_rule():
    bar = {0: 65.0, 1: 65.5, 2: 64.8}
    clear = verdict({0: 68.0, 1: 68.7, 2: 67.5}, bar)  # +3 on every seed
    assert clear["verdict"] == "distillable" and clear["p"] < 0.05 and clear["n"] == 3 and not clear["harmful"]
    noisy = verdict({0: 69.0, 1: 64.0, 2: 66.0}, bar)  # above on average, not consistently
    assert noisy["verdict"] == "inconclusive" and noisy["p"] > 0.05 and noisy["diff"] > 0
    below = verdict({0: 64.9, 1: 65.7, 2: 64.5}, bar)  # a little below on average, not significantly
    assert below["verdict"] == "KD-resistant" and not below["harmful"]
    harmful = verdict({0: 60.0, 1: 60.4, 2: 59.9}, bar)
    assert harmful["verdict"] == "KD-resistant" and harmful["harmful"]
    one = verdict({0: 70.0}, {0: 65.0})  # one seed: above the bar is never significant
    assert one["verdict"] == "inconclusive" and one["p"] is None and one["n"] == 1
    assert verdict({0: 60.0}, {0: 65.0})["verdict"] == "KD-resistant"
    # two seeds: the t-test has one degree of freedom, and METHOD.md section 8 asks for three
    two = verdict({0: 70.0, 1: 70.2}, {0: 65.0, 1: 65.1})
    assert two["p"] < 0.05 and two["verdict"] == "inconclusive" and two["n"] == 2
    two_below = verdict({0: 60.0, 1: 60.2}, {0: 65.0, 1: 65.1})
    assert two_below["p_less"] < 0.05 and two_below["verdict"] == "KD-resistant" and not two_below["harmful"]
    # only seeds both arms have are paired
    partial = verdict({0: 70.0, 1: 70.0, 5: 10.0}, {0: 65.0, 1: 65.0, 2: 99.0})
    assert partial["seeds"] == [0, 1] and partial["diff"] == 5.0
    assert verdict({}, bar)["verdict"] is None


def test_dfad_rows_are_tested_against_the_originals_dfad_student_seed_by_seed():
    import report
    dfad = {"original": {"accs": {0: 51.0, 1: 49.0, 2: 50.0}},
            "rml": {"accs": {0: 26.0, 1: 24.5, 2: 25.0}},        # far below on every seed
            "nasty": {"accs": {0: 52.0, 1: 48.0, 2: 51.0}},      # as the original, noisy
            "stingy": {"accs": {3: 20.0}}}                       # no seed in common
    report._dfad_against_original(dfad)
    rml, nasty, stingy = dfad["rml"], dfad["nasty"], dfad["stingy"]
    assert abs(rml["delta_original"] + 24.8333) < 1e-3 and rml["n_paired"] == 3 and rml["p_below"] < 0.001
    assert report._below_cell(rml).startswith("yes (p=")
    assert abs(nasty["delta_original"] - 0.3333) < 1e-3 and nasty["p_below"] > 0.5
    assert report._below_cell(nasty).startswith("not significantly (p=")
    assert stingy["delta_original"] is None and report._below_cell(stingy) == "–"
    assert "delta_original" not in dfad["original"]
    one = {"original": {"accs": {0: 50.0}}, "rml": {"accs": {0: 25.0}}}
    report._dfad_against_original(one)
    assert one["rml"]["delta_original"] == -25.0 and report._below_cell(one["rml"]) == "no test (n=1)"
