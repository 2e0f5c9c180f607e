"""The experiments CLI (saddlescape.experiments): each claim asserted with numbers on the quick
instance, and the files each experiment writes (PNG, CSV with its header, summary.txt)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from saddlescape import experiments  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_summary(folder: Path) -> dict[str, str]:
    lines = (folder / "summary.txt").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def check_files(out: Path, name: str, header: list[str]) -> list[dict[str, str]]:
    folder = out / name
    png = (folder / f"{name}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    with open(folder / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == header
    return rows


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


def test_saddle_rmsprop_reaches_the_basin_and_sgd_at_the_same_step_does_not(out):
    s = experiments.run("saddle", out, quick=True, progress=False)
    # the paper's Sec. 6 claim, over seeds: lr = 0.001
    assert s["rmsprop_lr0.001_fraction_in_basin"] >= 0.75
    assert s["rmsprop_lr0.001_final_f_median"] < -0.01
    assert s["sgd_lr0.001_fraction_in_basin"] == 0.0
    assert abs(s["sgd_lr0.001_final_f_median"]) < 0.002
    rows = check_files(out, "saddle", ["method", "lr", "step", "f_median", "f_q10", "f_q90"])
    first = [r for r in rows if r["step"] == "0"]
    assert all(float(r["f_median"]) == 0.0 for r in first)  # f(0) = 0: every run starts at the saddle
    assert {(r["method"], float(r["lr"])) for r in rows} == {
        ("SGD", lr) for lr in (0.03, 0.01, 0.007, 0.001)} | {("RMSProp", lr) for lr in (0.01, 0.001, 0.0001)}
    summary = read_summary(out / "saddle")
    assert float(summary["rmsprop_lr0.001_final_f_median"]) == pytest.approx(
        s["rmsprop_lr0.001_final_f_median"], rel=1e-5)
    last = [r for r in rows if r["method"] == "RMSProp" and float(r["lr"]) == 0.001][-1]
    assert float(last["f_median"]) == pytest.approx(s["rmsprop_lr0.001_final_f_median"], rel=1e-5)


def test_counterexample_ema_rmsprop_ends_at_the_wrong_end(out):
    s = experiments.run("counterexample", out, quick=True, progress=False)
    # C = 20: EMA RMSProp (beta = 0.9) ends with F > 0; the idealized method near -zeta
    assert s["C20_RMSProp_beta0.9_final_F"] > 0.3
    assert s["C20_idealized_final_F"] < -0.45
    assert s["C20_SGD_final_F"] < -0.45
    # C = 2: everyone converges
    for m in ("RMSProp_beta0.9", "idealized", "SGD"):
        assert s[f"C2_{m}_final_F"] < -0.45
    rows = check_files(out, "counterexample",
                       ["method", "C", "gap_median", "gap_q10", "gap_q90", "x_final_median"])
    for r in rows:  # iterates are projected: x in [-1, 1] and the gap in [0, 2 zeta]
        assert -1.0 <= float(r["x_final_median"]) <= 1.0
        assert 0.0 <= float(r["gap_median"]) <= 1.0 + 1e-12


def test_estimation_exponent_is_near_two_thirds(out):
    s = experiments.run("estimation", out, quick=True, progress=False)
    assert abs(s["fitted_exponent"] - 2 / 3) < 0.05
    rows = check_files(out, "estimation", ["eta", "best_one_minus_beta", "noise_free_best",
                                           "leading_order"])
    eta = np.array([float(r["eta"]) for r in rows])
    best = np.array([float(r["best_one_minus_beta"]) for r in rows])
    assert np.all(np.diff(eta) > 0) and np.all(np.diff(best) > 0)  # larger steps, shorter memory


def test_escape_time_adaptive_escapes_faster_when_escape_noise_is_small(out):
    s = experiments.run("escape-time", out, quick=True, progress=False)
    small, large = s["noise0.01_lr0.003_sgd_over_rmsprop"], s["noise1_lr0.003_sgd_over_rmsprop"]
    assert small > 3.0  # much faster with small noise along the escape direction
    assert small > 2 * large  # and the advantage grows as that noise shrinks
    assert s["noise0.01_lr0.003_rmsprop_escaped"] == 1.0
    # the control: SGD with RMSProp's effective step along e_2 escapes about as fast
    assert 0.5 < s["noise0.01_lr0.003_sgd_scaled_over_rmsprop"] < 2.0
    assert s["noise0.01_lr0.003_sgd_median_censored"] is False
    rows = check_files(out, "escape-time",
                       ["method", "escape_noise_variance", "lr", "seed", "escape_step", "escaped"])
    sgd = [int(r["escape_step"]) for r in rows
           if r["method"] == "SGD" and float(r["escape_noise_variance"]) == 0.01]
    assert np.median(sgd) == s["noise0.01_lr0.003_sgd_median_escape"]


def test_escape_times_censor_runs_that_never_escape():
    from saddlescape.experiments.escape_time import THRESHOLD, escape_times

    t = np.array([0, 10, 20, 30])
    x = np.zeros((3, 4, 2))
    x[0, 2, 1] = THRESHOLD          # escapes at step 20 (the threshold itself counts)
    x[1, 0, 1] = -2 * THRESHOLD     # escapes at once, in the negative direction
    x[2, :, 1] = 0.99 * THRESHOLD   # never: censored at horizon + 1
    x[2, :, 0] = 5.0                # the other coordinate does not count
    np.testing.assert_array_equal(escape_times(x, t, horizon=30), [20, 0, 31])


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        experiments.run("nope", tmp_path)
    with pytest.raises(ValueError, match="seeds must be an integer >= 1, got 0"):
        experiments.run("saddle", tmp_path, seeds=0)
    with pytest.raises(ValueError, match="--data is for beta-schedule only"):
        experiments.run("saddle", tmp_path, data="somewhere")
    with pytest.raises(ValueError, match="estimation: --seeds sets its noise replicas"):
        experiments.run("estimation", tmp_path, seeds=1)


def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "saddlescape.experiments"]
    r = subprocess.run(cmd + ["counterexample", "--out", str(tmp_path), "--quick", "--seeds", "2",
                              "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "== counterexample" in r.stdout and "seeds: 2" in r.stdout
    assert (tmp_path / "counterexample" / "summary.txt").exists()
    bad = subprocess.run(cmd + ["nope", "--out", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    bad = subprocess.run(cmd + ["saddle", "--out", str(tmp_path), "--seeds", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "seeds must be an integer >= 1" in bad.stderr
    a_file = tmp_path / "file"
    a_file.write_text("")
    bad = subprocess.run(cmd + ["counterexample", "--quick", "--out", str(a_file)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error in counterexample:" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_all_quick_writes_every_experiment(tmp_path):
    r = subprocess.run([sys.executable, "-m", "saddlescape.experiments", "all", "--quick",
                        "--out", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in experiments.EXPERIMENTS:
        if f"== {name} skipped:" in r.stdout:  # train without torch or scikit-learn
            assert name == "train"
            continue
        folder = tmp_path / name
        assert (folder / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
        assert (folder / f"{name}.csv").stat().st_size > 0
        assert read_summary(folder)
        assert f"== {name}" in r.stdout


def test_progress_uses_tqdm_and_falls_back_to_a_plain_bar(capsys, monkeypatch):
    from saddlescape.experiments.common import Progress

    pytest.importorskip("tqdm")
    bar = Progress("demo", 3)
    for _ in range(3):
        bar.advance()
    bar.close()
    err = capsys.readouterr().err
    assert bar._bar is not None and "demo" in err and "3/3" in err
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = Progress("demo", 2)
    bar.advance(2)
    bar.close()
    err = capsys.readouterr().err
    assert bar._bar is None and "[" + "#" * 30 + "] 2/2" in err


def rows_where(rows: list[dict[str, str]], **conditions: str) -> list[dict[str, str]]:
    return [r for r in rows if all(r[k] == v for k, v in conditions.items())]


def test_constants_against_closed_forms_and_the_propositions(out):
    s = experiments.run("constants", out, quick=True, progress=False)
    assert s["claimed_bounds_hold"] is True
    from saddlescape.experiments.constants import NAMES

    header = ["escape_noise_variance", "method", "proposition", "claimed", *NAMES, "nu_escape",
              "second_order_factor", "first_order_term", *(f"bound_{n}" for n in NAMES),
              "bound_second_order_factor", "bounds_hold", "violated"]
    rows = check_files(out, "constants", header)
    eps = 1e-8
    noises = sorted({float(r["escape_noise_variance"]) for r in rows})
    assert noises[0] <= 1e-4 and noises[-1] == 1.0
    # grad F = (x_1 + 10 x_1^9, -0.1 x_2 + 10 x_2^9) is largest at the box's corner (0.3, 0.3)
    g = np.array([0.3 + 10 * 0.3 ** 9, -0.03 + 10 * 0.3 ** 9])
    for r in rows:
        v = {k: float(r[k]) for k in (*NAMES, "nu_escape", "second_order_factor")}
        sv = float(r["escape_noise_variance"])
        assert v["second_order_factor"] == pytest.approx(
            v["Lambda1"] ** 4 * v["Lambda2"] ** 4 * v["Gamma"] ** 4
            / (v["lambda_minus"] ** 10 * v["nu"] ** 4), rel=1e-4)  # CSV rounding: 6 digits
        if r["method"] == "SGD":
            # A = I: Lambda = lambda_- = 1, Gamma = max tr G = 1 + s + |grad|^2 at the corner,
            # nu = min lambda_min(G) = s (on the line x_2 = 0 the gradient has no e_2 part)
            assert (v["Lambda1"], v["Lambda2"], v["lambda_minus"]) == (1.0, 1.0, 1.0)
            assert v["Gamma"] == pytest.approx(1 + sv + g @ g, rel=1e-5)
            assert v["nu"] == pytest.approx(sv, rel=1e-5)
            assert r["bounds_hold"] == "True" and r["claimed"] == "True"
        elif r["method"] == "RMSProp (full, idealized)":
            # on the escape axis near the saddle A = diag(., (s + eps)^(-1/2)) along grad f
            assert v["Lambda1"] == pytest.approx((sv + eps) ** -0.5, rel=1e-5)
            assert v["nu"] == pytest.approx(sv / (sv + eps), rel=1e-5)
            assert v["Gamma"] <= 2.0 and v["Gamma"] == pytest.approx(2.0, rel=1e-4)
            assert v["nu_escape"] == pytest.approx(v["nu"], rel=1e-5)
            assert r["bounds_hold"] == "True" and r["claimed"] == "True"
            for n in ("Lambda1", "Gamma", "nu", "lambda_minus"):  # Prop. 4.4 is attained
                assert float(r[f"bound_{n}"]) == pytest.approx(v[n], rel=2e-3)
            # Lambda_2 is not quite: near the saddle the model residual 10 x^9 is rounding
            assert v["Lambda2"] <= float(r["bound_Lambda2"]) * (1 + 1e-5)
        else:
            # the diagonal is not Prop. 4.4's: its nu is smaller (G's off-diagonal g_1 g_2)
            assert r["claimed"] == "False"
            full = rows_where(rows, escape_noise_variance=r["escape_noise_variance"],
                              method="RMSProp (full, idealized)")[0]
            assert v["nu"] < float(full["nu"])
            assert r["violated"] in ("", "nu")
    # the rescaled noise stays isotropic (nu ~ 1) for RMSProp but shrinks with s for SGD
    small = f"{noises[0]:g}"
    assert s[f"s{small}_full_nu"] > 0.99 and s[f"s{small}_sgd_nu"] <= 1.0001e-4
    # ... and yet the second-order factor favours SGD: Lambda_1^4 Lambda_2^4 = s^(-4)
    assert s[f"s{small}_sgd_over_full_factor"] < 0.1
    assert s["s1_sgd_over_full_factor"] == pytest.approx(2.09101 ** 4 / (16 * 1.091006 ** 5),
                                                         rel=1e-3)


def test_epsilon_bounds_10_11_and_the_runs(out):
    s = experiments.run("epsilon", out, quick=True, progress=False)
    header = ["eps", "bound_10", "bound_11", "prop_gamma_over_lminus2", "gamma_over_lminus",
              "gamma_over_lminus2", "second_order_factor", "lambda_min_G", "lambda_max_G",
              "family", "first_order_median", "first_order_reached", "escape_median", "escaped",
              "diverged"]
    rows = check_files(out, "epsilon", header)
    per_eps = {float(r["eps"]): r for r in rows_where(rows, family="idealized, fixed lr")}
    epss = sorted(per_eps)
    assert epss[0] == 0.0 and epss[-1] >= 100
    d = 2
    for e in epss:
        r = {k: float(v) for k, v in per_eps[e].items() if k != "family"}
        lo, hi = r["lambda_min_G"], r["lambda_max_G"]
        assert lo == pytest.approx(0.01, rel=1e-5)
        assert r["bound_10"] == pytest.approx(d * lo / (e + lo) * (hi + e), rel=1e-5)
        assert r["bound_11"] == pytest.approx(d ** 4 * (hi / lo) ** 4 * (hi + e), rel=1e-4)
        # Prop. 4.4's Gamma / lambda_-^2 is d lambda_max whatever eps
        assert r["prop_gamma_over_lminus2"] == pytest.approx(d * hi, rel=1e-5)
        # the measured constants satisfy the propositions: the factors are below the bounds
        assert r["gamma_over_lminus2"] <= r["prop_gamma_over_lminus2"] * (1 + 1e-5)
        assert r["second_order_factor"] <= r["bound_11"] * (1 + 1e-5)
    b10 = [float(per_eps[e]["bound_10"]) for e in epss]
    b11 = [float(per_eps[e]["bound_11"]) for e in epss]
    assert np.all(np.diff(b10) < 0) and np.all(np.diff(b11) > 0)  # Sec. 5.1's two directions
    # the runs: escaping is fastest at small eps for every family (as (11) says), ...
    assert s["ideal_escape_large_over_zero"] > 5 and s["theory_escape_large_over_zero"] > 5
    assert s["ema_best_eps_escape"] <= 1e-4
    # ... while with Theorem 4.2's step the first-order time barely moves, where bound (10)
    # falls 100-fold (it is not implied by Prop. 4.4; see diagnostics.bound_10)
    assert 0.7 < s["theory_first_order_large_over_zero"] < 1.4
    assert s["bound_10_large_over_zero"] < 0.02
    # with the fixed lr a large eps is SGD with the step lr / sqrt(eps): about as fast
    big = rows_where(rows, eps="1")
    ideal = float(rows_where(big, family="idealized, fixed lr")[0]["escape_median"])
    sgd = float(rows_where(big, family="SGD lr/sqrt(eps)")[0]["escape_median"])
    assert 0.7 < sgd / ideal < 1.4
    # eps = 0 runs the idealized method exactly (no control: lr / sqrt(0) is not a step)
    assert rows_where(rows, eps="0", family="SGD lr/sqrt(eps)")[0]["escape_median"] == "nan"


def test_first_order_times_take_the_running_mean_and_censor():
    from saddlescape.experiments.epsilon import first_order_times

    t = np.array([0, 10, 20, 30])
    gn = np.array([[1.0, 0.0, 0.0, 0.0],          # running mean of g^2: 1, .5, .33, .25
                   [0.1, 0.1, 0.1, 0.1],          # 0.01 throughout; T = 0 does not count
                   [0.0, np.nan, 0.0, 0.0],       # a stopped run never counts
                   [2.0, 2.0, 2.0, 2.0]])         # never: censored at horizon + 1
    np.testing.assert_array_equal(first_order_times(gn, t, 0.34, horizon=30), [20, 10, 31, 31])


def test_rmsprop_vs_sgd_bound_against_escape_times(out):
    s = experiments.run("rmsprop-vs-sgd", out, quick=True, progress=False)
    readings = ("bound", "middle", "constants", "aligned")
    header = ["sigma2", "escape_noise_variance", "lambda_min_G", "lambda_max_G",
              *(f"predicted_{r}" for r in readings),
              "sgd_median_escape", "full_median_escape", "diag_median_escape",
              "sgd_escaped", "full_escaped", "diag_escaped", "diverged",
              "measured_ratio_full", "measured_ratio_diag", "winner_measured_full",
              *(f"agrees_{r}" for r in readings)]
    rows = check_files(out, "rmsprop-vs-sgd", header)
    eps, d = 1e-8, 2
    for r in rows:
        lo, hi = float(r["lambda_min_G"]), float(r["lambda_max_G"])
        sigma2, sv = float(r["sigma2"]), float(r["escape_noise_variance"])
        assert lo == pytest.approx(sigma2 * sv, rel=1e-5)
        assert sigma2 < hi < sigma2 + 0.1
        # (12) vs (13): d^4 kappa^4 / (d^4 kappa^4 (lambda_max + eps))
        assert float(r["predicted_bound"]) == pytest.approx(1 / (hi + eps), rel=1e-5)
        # the aligned regime: d^4 kappa^4 against Gamma^4 / (lambda_-^10 nu^4) of Prop. 4.4
        aligned = (d * hi / (eps + hi)) ** 4 * (hi + eps) ** 5 / (lo / (lo + eps)) ** 4
        assert float(r["predicted_aligned"]) == pytest.approx(d ** 4 * (hi / lo) ** 4 / aligned,
                                                              rel=1e-4)
        # the middle of (12) is at most its right-hand side
        assert float(r["predicted_middle"]) <= float(r["predicted_bound"]) * (1 + 1e-5)
        ratio = float(r["sgd_median_escape"]) / float(r["full_median_escape"])
        assert float(r["measured_ratio_full"]) == pytest.approx(ratio, rel=1e-5)
    key = "sigma2_{}_s{}_measured_ratio_full"
    assert s[key.format(0.1, 0.01)] > 5 and s[key.format(0.1, 1)] > 1.5  # small G: RMSProp
    assert s[key.format(10, 1)] < 0.5                                     # large, isotropic: SGD
    # where the bound and the runs part: lambda_max = 1 or 10 with little escape-direction noise
    assert s[key.format(1, 0.01)] > 5 and s["sigma2_1_s0.01_predicted_bound"] < 1
    assert s[key.format(10, 0.01)] > 2 and s["sigma2_10_s0.01_predicted_bound"] < 0.2
    assert "sigma2=1,s=0.01" in s["answer"] and "sigma2=10,s=0.01" in s["answer"]
    # the escape depends on the noise along e_2 only (the problem is separable): sigma2 * s
    # = 0.1 gives the same SGD and diagonal-RMSProp runs for (0.1, 1) and (10, 0.01)
    a = rows_where(rows, sigma2="0.1", escape_noise_variance="1")[0]
    b = rows_where(rows, sigma2="10", escape_noise_variance="0.01")[0]
    assert a["sgd_median_escape"] == b["sgd_median_escape"]
    assert a["diag_median_escape"] == b["diag_median_escape"]
    assert s["same_escape_noise_max_spread"] < 0.05
