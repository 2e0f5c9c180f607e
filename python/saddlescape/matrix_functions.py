"""Inverse matrix roots: the preconditioners of adaptive methods.

Every function here is computed in C++ (LAPACK through the scipy-openblas32 wheel) with the GIL
released. Shared semantics:

* ``G`` is symmetric positive semidefinite, float32 or float64, of shape (d, d) or a batch
  (n, d, d); the result has the input's dtype and shape. C-contiguous arrays are read in place,
  others are copied once. The input is never modified.
* ``form="inv_sqrt"`` is (G + eps I)^(-1/2), the form analysed in the paper; ``form="adam"`` is
  (G^(1/2) + eps I)^(-1), the form Adam and RMSProp implement. Neither is a hidden default.
* G must be symmetric to within 1000 machine epsilons of max|G|; the two triangles are averaged.
* Eigenvalues negative only through rounding, >= -d * machine epsilon * lambda_max, are clipped to
  zero; a clearly negative eigenvalue is a ValueError naming it.
* With ``eps = 0`` a singular G (smallest eigenvalue within d * machine epsilon * lambda_max of
  zero) has no inverse root: :class:`saddlescape.NumericalError`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from saddlescape import _core
from saddlescape._validation import choice as _choice
from saddlescape._validation import int32 as _int32
from saddlescape._validation import real as _float

Form = Literal["inv_sqrt", "adam"]
Method = Literal["eigh", "newton"]

__all__ = ["diag_inv_sqrt", "inv_root", "inv_sqrt", "inv_sqrt_apply"]

_FORMS = ("inv_sqrt", "adam")
_METHODS = ("eigh", "newton")


def _newton_args(tol: float | None, max_iter: int) -> tuple[float, int]:
    t = 0.0 if tol is None else _float("tol", tol)
    if tol is not None and not t > 0:
        raise ValueError(f"tol must be > 0 (or None for the default), got {tol!r}")
    return t, _int32("max_iter", max_iter)


def inv_sqrt(
    G: npt.ArrayLike,
    eps: float = 0.0,
    form: Form = "inv_sqrt",
    method: Method = "eigh",
    *,
    tol: float | None = None,
    max_iter: int = 100,
) -> np.ndarray:
    """The preconditioner A = (G + eps I)^(-1/2), or (G^(1/2) + eps I)^(-1) for ``form="adam"``.

    Args:
        G: symmetric positive semidefinite matrix, shape (d, d), or a batch of shape (n, d, d);
            float32 or float64.
        eps: damping, a finite number >= 0.
        form: ``"inv_sqrt"`` for (G + eps I)^(-1/2), ``"adam"`` for (G^(1/2) + eps I)^(-1).
        method: ``"eigh"``: LAPACK's symmetric eigendecomposition G = V diag(lambda) V^T, then
            A = W W^T with W = V diag(f(lambda)^(1/2)) (a rank-d syrk, half a general product).
            ``"newton"``: the matmul-only coupled Newton iteration (Guo and Higham, 2006); it
            supports ``form="inv_sqrt"`` only and needs a positive definite G + eps I.
        tol: Newton only: stop when ||M_k - I||_F / sqrt(d) <= tol, where M_k = X_k^2 (G + eps I)
            tends to I. None: 100 * machine epsilon * sqrt(d).
        max_iter: Newton only: more iterations raise NumericalError rather than return a partial
            result.

    Returns:
        A, with G's shape and dtype.

    Raises:
        ValueError: G is not a float array of shape (d, d) or (n, d, d), has a NaN or Inf entry,
            is not symmetric, or has a clearly negative eigenvalue; eps < 0; an unknown form or
            method; the adam form with method "newton".
        NumericalError: G is singular and eps = 0; the eigensolver or the Newton iteration did not
            converge; the result overflows.
    """
    t, it = _newton_args(tol, max_iter)
    return _core.inv_root(np.asarray(G), 2, _float("eps", eps), _choice("form", form, _FORMS),
                          _choice("method", method, _METHODS), t, it)


def inv_root(
    G: npt.ArrayLike,
    p: int,
    eps: float = 0.0,
    method: Method = "eigh",
    *,
    tol: float | None = None,
    max_iter: int = 100,
) -> np.ndarray:
    """(G + eps I)^(-1/p) for an integer p >= 1 (p = 1 is the inverse, p = 2 :func:`inv_sqrt`).

    Args:
        G: symmetric positive semidefinite, shape (d, d) or (n, d, d), float32 or float64.
        p: the root, an integer >= 1.
        eps: damping, a finite number >= 0.
        method: ``"eigh"`` or ``"newton"``, as in :func:`inv_sqrt`; Newton uses the coupled
            iteration X <- X T, M <- T^p M with T = ((p + 1) I - M) / p.
        tol: Newton's tolerance, as in :func:`inv_sqrt`.
        max_iter: Newton's iteration cap.

    Returns:
        (G + eps I)^(-1/p), with G's shape and dtype.

    Raises:
        ValueError: p is not an integer >= 1, and every bad input of :func:`inv_sqrt`.
        NumericalError: as :func:`inv_sqrt`.
    """
    t, it = _newton_args(tol, max_iter)
    return _core.inv_root(np.asarray(G), _int32("p", p), _float("eps", eps), "inv_sqrt",
                          _choice("method", method, _METHODS), t, it)


def inv_sqrt_apply(
    G: npt.ArrayLike,
    v: npt.ArrayLike,
    eps: float = 0.0,
    form: Form = "inv_sqrt",
    *,
    method: Method = "eigh",
    tol: float | None = None,
    max_iter: int = 100,
) -> np.ndarray:
    """A v for A = :func:`inv_sqrt`(G, eps, form), without returning A.

    With ``method="eigh"`` A is never formed: A v = V (f(Lambda) (V^T v)), two products of
    2 d^2 k flops instead of the d^3 of the reconstruction.

    Args:
        G: symmetric positive semidefinite, shape (d, d), float32 or float64.
        v: shape (d,) or (d, k). A float v of another dtype than G's promotes both to the common
            float type (numpy's rules); an integer v takes G's dtype. That is the result's dtype.
        eps, form, method, tol, max_iter: as in :func:`inv_sqrt`.

    Returns:
        A v, with v's shape.

    Raises:
        ValueError: v's leading dimension differs from d, v has a NaN or Inf entry, and every
            bad input of :func:`inv_sqrt`.
        NumericalError: as :func:`inv_sqrt`.
    """
    t, it = _newton_args(tol, max_iter)
    G = np.asarray(G)
    v = np.asarray(v)
    if G.dtype != v.dtype and G.dtype.kind == "f" and v.dtype.kind in "fiu":
        # numpy's promotion, except that integers join G's float type (float32 stays float32)
        common = G.dtype if v.dtype.kind in "iu" else np.result_type(G.dtype, v.dtype)
        G, v = G.astype(common, copy=False), v.astype(common, copy=False)
    return _core.inv_root_apply(G, v, 2, _float("eps", eps), _choice("form", form, _FORMS),
                                _choice("method", method, _METHODS), t, it)


def diag_inv_sqrt(v: npt.ArrayLike, eps: float = 0.0, form: Form = "inv_sqrt") -> np.ndarray:
    """The diagonal preconditioner, elementwise: (v + eps)^(-1/2), or 1 / (sqrt(v) + eps).

    Args:
        v: the diagonal of G (entries >= 0), any shape, float32 or float64.
        eps: damping, a finite number >= 0.
        form: ``"inv_sqrt"`` or ``"adam"``.

    Returns:
        An array of v's shape and dtype.

    Raises:
        ValueError: a negative, NaN or Inf entry (named with its flat index); eps < 0; an
            unknown form; a non-float dtype.
        NumericalError: a zero entry with eps = 0, or overflow.
    """
    return _core.diag_inv_root(np.asarray(v), 2, _float("eps", eps), _choice("form", form, _FORMS))
