"""A CPU stand-in for saddlescape.cuda's batched routines, for the tests of the code that drives
them (saddlescape.torch's device engine and its diagonal step on a GPU), which otherwise run only
where a GPU is.

It keeps the documented contract of the real functions and asserts it, so that a call the real
module would refuse fails here too: torch tensors stand for device arrays; the arrays of a call
share one float dtype and are C-contiguous; G is (n, d, d), its gradients (n, d) or (n, k, d),
V (n, d) or (n, d, k); in-place arguments are written, others never; inv_root_apply returns a
new tensor of V's shape and dtype; scalars are Python numbers in range. Arithmetic follows the
CPU library, which the real module matches to rounding: the EMA summed in float64 and rounded
once, subnormals flushed, a non-finite gradient a ValueError and one whose square overflows a
NumericalError, before anything is written; the diagonal step's v <- beta v + (1 - beta) (g g); f(G_b) V_b from :func:`saddlescape.inv_sqrt_apply` on each block in
the input's dtype.

``fail_next = k`` makes the next k calls of inv_root_apply raise NumericalError (before they
compute anything), as a failing eigensolver would; ``calls`` counts the calls by function and
method.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
import torch

import saddlescape


def _array(name: str, a: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    assert isinstance(a, torch.Tensor), f"{name} must be a tensor, got {type(a).__name__}"
    assert a.dtype in (torch.float32, torch.float64), f"{name} has dtype {a.dtype}"
    assert dtype is None or a.dtype == dtype, f"{name} has dtype {a.dtype}, G's is {dtype}"
    assert a.is_contiguous(), f"{name} is not C-contiguous"
    assert not a.requires_grad, f"{name} requires grad (no __cuda_array_interface__ then)"
    return a


def _scalar(name: str, x: Any, lo: float, hi: float | None = None) -> float:
    assert isinstance(x, (int, float)) and not isinstance(x, bool), f"{name} is {x!r}"
    assert math.isfinite(x) and x >= lo and (hi is None or x < hi), f"{name} = {x!r}"
    return float(x)


def _checked(g: torch.Tensor) -> None:
    """The real module's checks of a gradient, before anything is written."""
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gs has a non-finite entry")
    top = float(g.abs().max()) if g.numel() else 0.0
    if not top * top <= torch.finfo(g.dtype).max:
        raise saddlescape.NumericalError(f"g^2 = {top}^2 overflows {g.dtype}")


class FakeCuda:
    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.fail_next = 0

    def ema_update_batched(self, G: Any, gs: Any, betas: Any, *, stream: Any = None) -> None:
        G = _array("G", G)
        gs = _array("gs", gs, G.dtype)
        assert G.ndim == 3 and G.shape[1] == G.shape[2], f"G has shape {tuple(G.shape)}"
        n, d = G.shape[0], G.shape[1]
        assert gs.shape in ((n, d),) or (gs.ndim == 3 and gs.shape[::2] == (n, d)), \
            f"gs has shape {tuple(gs.shape)} for G {tuple(G.shape)}"
        assert G.data_ptr() != gs.data_ptr()
        beta = _scalar("betas", betas, 0.0, 1.0)
        self.calls["ema_update_batched"] += 1
        _checked(gs)
        g = gs.double().reshape(n, -1, d)
        acc = G.double()
        for i in range(g.shape[1]):
            # the outer product first: (1 - beta) g_i g_j then rounds alike in both triangles
            acc = beta * acc + (1.0 - beta) * (g[:, i, :, None] * g[:, i, None, :])
        acc[acc.abs() < torch.finfo(G.dtype).tiny] = 0.0
        G.copy_(acc.to(G.dtype))

    def inv_root_apply(self, G: Any, V: Any, eps: float = 0.0, p: int = 2,
                       form: str = "inv_sqrt", method: str = "auto", *,
                       stream: Any = None) -> torch.Tensor:
        G = _array("G", G)
        V = _array("V", V, G.dtype)
        assert G.ndim == 3 and G.shape[1] == G.shape[2], f"G has shape {tuple(G.shape)}"
        assert V.shape[:2] == G.shape[:2] and V.ndim in (2, 3), f"V has shape {tuple(V.shape)}"
        assert p == 2 and form in ("inv_sqrt", "adam")
        assert method in ("auto", "jacobi", "batched_qr", "divide_conquer")
        e = _scalar("eps", eps, 0.0)
        self.calls[f"inv_root_apply:{method}"] += 1
        if self.fail_next:
            self.fail_next -= 1
            raise saddlescape.NumericalError("fake: the eigensolver did not converge")
        out = np.stack([saddlescape.inv_sqrt_apply(Gb, Vb, e, form)
                        for Gb, Vb in zip(G.numpy(), V.numpy())])
        return torch.from_numpy(out.astype(G.numpy().dtype, copy=False)).reshape(V.shape)

    def rmsprop_diag_step(self, x: Any, g: Any, v: Any, lr: float, beta: float,
                          eps: float = 1e-8, form: str = "inv_sqrt", check: bool = True, *,
                          stream: Any = None) -> None:
        x = _array("x", x)
        g = _array("g", g, x.dtype)
        v = _array("v", v, x.dtype)
        assert g.shape == x.shape == v.shape
        assert len({x.data_ptr(), g.data_ptr(), v.data_ptr()}) == 3
        lr_ = _scalar("lr", lr, 0.0)
        b = _scalar("beta", beta, 0.0, 1.0)
        e = _scalar("eps", eps, 0.0)
        assert e > 0 and form in ("inv_sqrt", "adam") and isinstance(check, bool)
        self.calls["rmsprop_diag_step"] += 1
        if check:
            _checked(g)
        v.mul_(b).add_((g * g).mul_(1.0 - b))  # the kernel's a (g g): g^2 may overflow
        v.masked_fill_(v < torch.finfo(v.dtype).tiny, 0.0)
        den = (v + e).sqrt_() if form == "inv_sqrt" else v.sqrt().add_(e)
        x.addcdiv_(g, den, value=-lr_)
