"""Training real networks: saddlescape.torch's optimizers against torch.optim on digits.

scikit-learn's 8 x 8 digits (1797 images, no download), standardised, a fixed stratified split
(1347 train, 450 test); minibatches of 64, cross-entropy. Two models:

* ``mlp``: 64-256-256-10 with ReLU (85,002 parameters, the block issue's model);
* ``cnn``: conv 1->8 3x3 (padding 1), ReLU, conv 8->16 3x3, ReLU, 2x2 max-pool, linear 256->10
  (4,074 parameters).

Optimizers, each with its own step size (a short sweep picked these; see ``_optimizers``):
torch.optim.Adam, torch.optim.RMSprop, saddlescape.torch.RMSProp with structure "diag"
(both forms), with structure "block" (B = 256 on the MLP, 64 on the CNN) in both forms with a
constant beta = 0.99 and with beta="auto" (beta_t = 1 - C lr^(2/3), C = 1), and
saddlescape.torch.Adam with structure "block"; pytorch-optimizer's Shampoo and SOAP where that
package is installed (otherwise the summary says they were skipped).

Writes training loss (mean over the epoch's batches) and test accuracy per epoch, mean over
seeds with a min-max band, as PNG; every (model, optimizer, seed, epoch) as CSV; and the final
accuracy (mean and standard deviation over seeds) and seconds per epoch in the summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from saddlescape.experiments.common import Output, Progress, pyplot

BATCH = 64


def _data() -> tuple[Any, Any, Any, Any]:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=450, random_state=0, stratify=y)
    mean, std = Xtr.mean(), Xtr.std()
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def _model(name: str) -> Any:
    import torch.nn as nn

    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(256, 10))


def _optimizers(model_name: str) -> dict[str, Callable[[Any], Any]]:
    import torch

    import saddlescape.torch as st

    B = 256 if model_name == "mlp" else 64
    # Step sizes from a sweep over {3e-4, 1e-3, 3e-3, 1e-2} (MLP, 3 epochs, seed 0), each the
    # lowest training loss. The adam form with float32 block estimates takes eps = 1e-4: float32
    # resolves eigenvalues only down to about B u lambda_max, and below that 1 / eps is applied
    # (eps = 1e-6 diverged; see the README's notes on eps).
    out: dict[str, Callable[[Any], Any]] = {
        "torch Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "torch RMSprop": lambda p: torch.optim.RMSprop(p, lr=3e-3),
        "diag RMSProp inv_sqrt": lambda p: st.RMSProp(p, lr=1e-3, structure="diag"),
        "diag RMSProp adam": lambda p: st.RMSProp(p, lr=1e-3, structure="diag", form="adam"),
        "block RMSProp inv_sqrt": lambda p: st.RMSProp(p, lr=1e-2, block_size=B, eps=1e-6),
        "block RMSProp adam": lambda p: st.RMSProp(p, lr=1e-2, block_size=B, form="adam",
                                                   eps=1e-4),
        "block RMSProp inv_sqrt auto": lambda p: st.RMSProp(p, lr=1e-2, block_size=B, eps=1e-6,
                                                            beta="auto", C=1.0),
        "block Adam": lambda p: st.Adam(p, lr=1e-2, structure="block", block_size=B, eps=1e-4),
    }
    try:
        import pytorch_optimizer as po  # optional; not a dependency

        # The same sweep, extended up to 3 for Shampoo, whose loss still fell at 1e-2 (its best
        # was lr = 1: its default 1e-3 left the MLP at 20% accuracy after 3 epochs).
        out["Shampoo (pytorch-optimizer)"] = lambda p: po.Shampoo(p, lr=1.0)
        out["SOAP (pytorch-optimizer)"] = lambda p: po.SOAP(p, lr=1e-2)
    except ImportError:
        pass
    return out


QUICK = ("torch Adam", "diag RMSProp inv_sqrt", "block RMSProp inv_sqrt")


def _train(model_name: str, make: Callable[[Any], Any], seed: int, epochs: int,
           data: tuple[Any, ...]) -> tuple[list[float], list[float], float]:
    import torch

    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = _model(model_name)
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    losses, accs = [], []
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=gen)
        total, batches = 0.0, 0
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]

            def closure() -> Any:
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
                loss.backward()
                return loss

            total += float(opt.step(closure).detach())
            batches += 1
        losses.append(total / batches)
        with torch.no_grad():
            accs.append(float((model(Xte).argmax(1) == yte).float().mean()))
    return losses, accs, (time.perf_counter() - start) / epochs


def run(out: Path, quick: bool = False, seeds: int | None = None,
        progress: bool = True) -> dict[str, Any]:
    try:
        import torch  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError("the train experiment needs torch and scikit-learn "
                          "(pip install torch==2.13.0 scikit-learn)") from e
    o = Output.create(out, "train")
    epochs = 2 if quick else 8
    n_seeds = seeds or (1 if quick else 2)
    models = ("mlp",) if quick else ("mlp", "cnn")
    data = _data()
    plans = {m: {k: v for k, v in _optimizers(m).items() if not quick or k in QUICK}
             for m in models}
    bar = Progress("train", sum(len(p) for p in plans.values()) * n_seeds, progress)
    results: dict[tuple[str, str], list[tuple[list[float], list[float], float]]] = {}
    for m, opts in plans.items():
        for name, make in opts.items():
            for seed in range(n_seeds):
                results.setdefault((m, name), []).append(_train(m, make, seed, epochs, data))
                bar.advance()
    bar.close()

    rows = []
    for (m, name), runs in results.items():
        for seed, (losses, accs, sec) in enumerate(runs):
            for e, (loss, acc) in enumerate(zip(losses, accs)):
                rows.append((m, name, seed, e + 1, loss, acc, sec))
    o.write_csv(["model", "optimizer", "seed", "epoch", "train_loss", "test_accuracy",
                 "seconds_per_epoch"], rows)

    plt = pyplot()
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for r, m in enumerate(models):
        for i, name in enumerate(plans[m]):
            runs = results[(m, name)]
            ep = np.arange(1, epochs + 1)
            for c, k in enumerate((0, 1)):
                vals = np.array([run_[k] for run_ in runs])
                ax = axes[r][c]
                ax.plot(ep, vals.mean(0), color=f"C{i % 10}", ls="-" if i < 10 else "--",
                        label=name)
                ax.fill_between(ep, vals.min(0), vals.max(0), color=f"C{i % 10}", alpha=0.15)
        axes[r][0].set(yscale="log", xlabel="epoch", ylabel="training loss",
                       title=f"{m}: training loss ({n_seeds} seeds)")
        axes[r][1].set(xlabel="epoch", ylabel="test accuracy", title=f"{m}: test accuracy",
                       ylim=(0.8, 1.0))
        axes[r][0].legend(fontsize=7)
    o.save_figure(fig)

    summary: dict[str, Any] = {}
    for (m, name), runs in results.items():
        final = np.array([run_[1][-1] for run_ in runs])
        summary[f"{m} | {name} | test accuracy"] = (f"{final.mean():.4f} +- {final.std():.4f}")
        summary[f"{m} | {name} | final train loss"] = float(np.mean([r_[0][-1] for r_ in runs]))
        summary[f"{m} | {name} | seconds per epoch"] = float(np.mean([r_[2] for r_ in runs]))
    if not any("pytorch-optimizer" in k for k in plans[models[0]]):
        summary["pytorch-optimizer"] = "not installed: Shampoo and SOAP skipped"
    return o.finish(epochs=epochs, seeds=n_seeds, **summary)
