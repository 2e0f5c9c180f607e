"""saddlescape: adaptive methods as preconditioned SGD.

An adaptive method (RMSProp, Adam, Adagrad) is preconditioned SGD, x <- x - eta * A g, with
A = (G + eps I)^(-1/2) built from the gradient second moment G = E[g g^T] (Staib, Reddi, Kale,
Kumar and Sra, "Escaping Saddle Points with Adaptive Gradient Methods", ICML 2019). The numbers
are computed by a C++ core (``saddlescape._core``); this package checks arguments and documents
the semantics.
"""

from __future__ import annotations

from pathlib import Path

from saddlescape import blocks, datasets, diagnostics, problems, schedules, studies
from saddlescape._core import NumericalError
from saddlescape.blocks import BlockEngine
from saddlescape.estimators import CovarianceEstimator, EMAEstimator, burn_in
from saddlescape.matrix_functions import diag_inv_sqrt, inv_root, inv_sqrt, inv_sqrt_apply
from saddlescape.optimizers import SGD, Adam, PreconditionedSGD, RMSProp, SaddleEscape
from saddlescape.runner import ChunkError, DivergenceError, RunManyResult, RunResult, run, run_many
from saddlescape.schedules import beta_from_lr

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "BlockEngine",
    "ChunkError",
    "CovarianceEstimator",
    "DivergenceError",
    "EMAEstimator",
    "NumericalError",
    "PreconditionedSGD",
    "RMSProp",
    "RunManyResult",
    "RunResult",
    "SaddleEscape",
    "__version__",
    "beta_from_lr",
    "blocks",
    "burn_in",
    "cmake_dir",
    "datasets",
    "diag_inv_sqrt",
    "diagnostics",
    "get_include",
    "inv_root",
    "inv_sqrt",
    "inv_sqrt_apply",
    "problems",
    "run",
    "run_many",
    "schedules",
    "studies",
]

NumericalError.__doc__ = (
    "A computation on valid input failed numerically: a singular matrix with eps = 0, an "
    "iteration that did not converge, or a result that overflowed. Subclass of ArithmeticError."
)


def cmake_dir() -> str:
    """The folder of saddlescapeConfig.cmake, for ``-Dsaddlescape_DIR=...`` in C++ projects."""
    return str(Path(__file__).parent / "lib" / "cmake" / "saddlescape")


def get_include() -> str:
    """The folder holding the C++ headers (``#include <saddlescape/saddlescape.hpp>``)."""
    return str(Path(__file__).parent / "include")
