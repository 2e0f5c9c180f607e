"""What every experiment shares: its output files, a progress bar (tqdm, or a plain one), and
seed-band plots.

An experiment writes into its own folder ``OUT/NAME/``: ``NAME.png`` (the figure), ``NAME.csv``
(the plotted data, one row per point, with a header) and ``summary.txt`` (the numbers that
matter, one ``key: value`` per line). Its ``run`` returns the summary as a dict.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


class _Plotter:
    """The few pyplot calls the experiments make, on matplotlib's object-oriented API: figures
    are made without pyplot, so that running an experiment from a notebook leaves the
    session's plotting backend alone (PNG files are drawn by the Agg canvas either way)."""

    def __init__(self, matplotlib: Any) -> None:
        self._mpl = matplotlib

    def subplots(self, *args: Any, figsize: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    def get_cmap(self, name: str) -> Any:
        return self._mpl.colormaps[name]

    def close(self, fig: Any) -> None:
        fig.clear()


def pyplot() -> _Plotter:
    """A pyplot-like plotter (subplots, get_cmap, close), or a clear ImportError."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the experiments plot with matplotlib: "
                          "pip install 'saddlescape[experiments]'") from e
    return _Plotter(matplotlib)


@dataclass
class Output:
    """The files of one experiment: OUT/NAME/{NAME.png, NAME.csv, summary.txt}."""

    folder: Path
    name: str
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, out: str | Path, name: str) -> "Output":
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, name)

    @property
    def png(self) -> Path:
        return self.folder / f"{self.name}.png"

    @property
    def csv(self) -> Path:
        return self.folder / f"{self.name}.csv"

    def write_csv(self, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        with open(self.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for row in rows:
                w.writerow([_fmt(v) for v in row])

    def save_figure(self, fig: Any) -> None:
        fig.tight_layout()
        fig.savefig(self.png, dpi=120)
        pyplot().close(fig)

    def finish(self, **numbers: Any) -> dict[str, Any]:
        """Writes summary.txt from the numbers (and those already in self.summary)."""
        self.summary.update(numbers)
        lines = [f"{k}: {_fmt(v)}" for k, v in self.summary.items()]
        (self.folder / "summary.txt").write_text("\n".join(lines) + "\n")
        return dict(self.summary)


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


class Progress:
    """A progress bar on stderr (silent when ``enabled`` is false): tqdm's when tqdm is installed
    (it is in the ``experiments`` extra), else a plain one-line bar, so that the CLI works
    without it."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, max(1, total), enabled
        self.done = 0
        self.start = time.perf_counter()
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=label, file=sys.stderr, dynamic_ncols=True)
        self._draw()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
        self._draw()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self) -> None:
        if not self.enabled or self._bar is not None:
            return
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label:<28} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {elapsed:5.1f}s")
        sys.stderr.flush()


def bands(values: np.ndarray, quantiles: tuple[float, float] = (0.1, 0.9)) -> tuple[np.ndarray, ...]:
    """The median and a quantile band over seeds (axis 0)."""
    lo, hi = quantiles
    return (np.median(values, axis=0), np.quantile(values, lo, axis=0),
            np.quantile(values, hi, axis=0))
