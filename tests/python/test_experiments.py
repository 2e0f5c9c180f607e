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
