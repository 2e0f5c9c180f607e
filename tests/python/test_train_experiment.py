"""The train experiment (saddlescape.torch against torch.optim on digits), quick instance: the
files it writes, and that every optimizer in it actually trains the MLP."""

from __future__ import annotations

import csv
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from saddlescape import experiments  # noqa: E402
from saddlescape.experiments import train  # noqa: E402

HEADER = ["model", "optimizer", "seed", "epoch", "train_loss", "test_accuracy",
          "seconds_per_epoch"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    summary = experiments.run("train", out, quick=True, progress=False)
    with open(out / "train" / "train.csv") as f:
        rows = list(csv.DictReader(f))
    return out / "train", summary, rows


def test_writes_the_figure_the_table_and_the_summary(quick):
    folder, summary, rows = quick
    assert (folder / "train.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert rows and list(rows[0]) == HEADER
    assert (folder / "summary.txt").read_text().count("\n") == len(summary)
    assert summary["epochs"] == 2 and summary["seeds"] == 1
    # one row per (optimizer, epoch) of the quick instance, all on the MLP
    assert {r["optimizer"] for r in rows} == set(train.QUICK)
    assert len(rows) == 2 * len(train.QUICK) and {r["model"] for r in rows} == {"mlp"}


def test_every_optimizer_trains(quick):
    _, summary, rows = quick
    for name in train.QUICK:
        mine = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: int(r["epoch"]))
        loss = [float(r["train_loss"]) for r in mine]
        acc = [float(r["test_accuracy"]) for r in mine]
        assert all(math.isfinite(v) for v in loss + acc), name
        # from log(10) = 2.30 at initialisation; digits is easy, two epochs get far below it
        assert loss[-1] < loss[0] < 2.3, (name, loss)
        assert acc[-1] > 0.8, (name, acc)  # chance is 0.1
        a, s = summary[f"mlp | {name} | test accuracy"].split(" +- ")
        assert float(a) == pytest.approx(acc[-1], abs=1e-4) and float(s) == 0.0


def test_the_full_plan_covers_the_issue():
    # without running it: both forms of block RMSProp, constant beta and beta="auto", the
    # diagonal rule, block Adam and both torch.optim baselines, on both models
    for model in ("mlp", "cnn"):
        names = set(train._optimizers(model))
        assert {"torch Adam", "torch RMSprop", "diag RMSProp inv_sqrt", "diag RMSProp adam",
                "block RMSProp inv_sqrt", "block RMSProp adam", "block RMSProp inv_sqrt auto",
                "block Adam"} <= names
