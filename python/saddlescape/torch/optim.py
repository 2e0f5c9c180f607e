"""The paper's optimizers as ``torch.optim.Optimizer`` subclasses.

:class:`RMSProp` and :class:`Adam` precondition a model's gradients with the EMA estimate G of
E[g g^T], as the numpy-level :class:`saddlescape.RMSProp` / :class:`saddlescape.Adam` do on one
flat vector, with the conventions of ``torch.optim``: param groups with their own options,
``step(closure)`` returning the loss, ``zero_grad``, ``state_dict`` / ``load_state_dict``, and any
``torch.optim.lr_scheduler`` (the lr is read from the group at every step).

Per parameter tensor p with gradient g (weight decay first, as torch's: g <- g + wd p):

* ``structure="diag"``: v <- beta v + (1 - beta) g^2 elementwise, p <- p - lr g / den(v),
  den = sqrt(v + eps) (``form="inv_sqrt"``, the paper's (G + eps I)^(-1/2)) or sqrt(v) + eps
  (``form="adam"``, what torch.optim.RMSprop computes). On CPU one fused C++ pass per group over
  the tensors' own memory; on CUDA torch operations.
* ``structure="block"``: p is flattened and cut into consecutive blocks of at most
  ``block_size`` entries (:func:`saddlescape.partition`; a tensor with fewer entries, a bias say,
  is one block of its own size; blocks never span two tensors). Each block keeps the full matrix
  G_b <- beta G_b + (1 - beta) g_b g_b^T and takes the exact step
  p_b <- p_b - lr (G_b + eps I)^(-1/2) g_b (or (G_b^(1/2) + eps I)^(-1) g_b) at every step,
  through one :class:`saddlescape.BlockEngine` per tensor (eigendecompositions staggered over
  ``refresh_every`` updates, the updates since applied exactly; see :mod:`saddlescape.blocks`).
  :meth:`RMSProp.partition` lists the blocks.
* ``structure="full"``: one block over all the parameters of a group, concatenated in the
  group's order (small models: it stores (sum of numel)^2 entries). Every parameter of the
  group must have a gradient when any has (the matrix couples them all).

Counting. Each parameter counts its own steps: ``burn_in = W`` makes a parameter's first W
steps update its estimate only (Algorithm 3). ``beta="auto"`` (with ``C``) uses
beta_t = 1 - C lr_t^(2/3) at each step, lr_t the group's lr at that call of ``step()``, so the
paper's beta-lr coupling (Theorem 4.1, Sec. 5.4) follows any scheduler (t counts the calls of
``step()``; hallucinated samples of :class:`SaddleEscape` use the lr of their step). A value
below 0 (C lr^(2/3) > 1) is a ValueError; lr = 0 gives the largest beta below 1.
``bias_correction=True`` divides the estimate by 1 - prod_t beta_t.

Devices. ``engine`` chooses where a "block" or "full" step computes:

* ``"host"``: the C++ block engine above, in host memory. For parameters on a GPU a step copies
  the gradient to the host and the direction back (2 numel entries over PCIe) and keeps the
  estimates, eigenbases and Adam's first moment in host memory, so that it equals the CPU
  optimizer's step to rounding (the weight decay and the final add run on the device).
* ``"device"``: the estimates stay on the parameters' GPU, in (n, B, B) stacks of same-size
  blocks, and each step is :func:`saddlescape.cuda.ema_update_batched` followed by
  :func:`saddlescape.cuda.inv_root_apply` (an eigendecomposition of every block at every step:
  no ``refresh_every`` period, no low-rank updates; the exact step, as
  ``saddlescape.RMSProp(structure="block", solver="eigh")``, to rounding). The bias correction
  enters as a scaled eps, f(G / s) = s^(1/2) f_(eps') (G) with eps' = s eps (inv_sqrt) or
  s^(1/2) eps (adam). The directions come from updated copies of at most 256 MiB of blocks
  at a time (the step's extra device memory), and the estimates are updated in place only
  once every direction is known and finite. A stack whose eigendecomposition fails is retried
  once in float64 by the one-block-at-a-time divide-and-conquer route, then
  (``fallback_eps > 0``) with eps + fallback_eps; if that fails too the step raises
  NumericalError with nothing changed. Needs CUDA parameters and a usable
  :mod:`saddlescape.cuda` (else CUDAUnavailableError, with its reason, at the first step).
* ``"auto"`` (default): "device" for CUDA parameters when :func:`saddlescape.cuda.is_available`,
  "host" otherwise. The engine is where the optimizer computes, not part of its state: a state
  saved by one engine loads into the other (converted; see :meth:`RMSProp.load_state_dict`).

"diag" runs on the parameters' device: on CPU the fused C++ pass, on CUDA
:func:`saddlescape.cuda.rmsprop_diag_step` where it applies (RMSProp without bias correction,
float32/float64 contiguous parameters with estimates of their dtype, past the burn-in) and
torch operations otherwise; ``engine`` does not concern it.

Dtypes. Parameters must be float32 or float64 (float16/bfloat16 and complex are refused with a
TypeError naming them), on one device per optimizer. The estimate's dtype is ``dtype`` (default:
the parameter's); float32 and float64 parameters with estimates of their own dtype are read and
updated in place without copies.

Errors. A gradient (with weight decay: g + wd p) with a NaN or Inf, or too large for the route
that takes it (its square, weighted by 1 - beta on the CPU's elementwise routes, by 1 on the
GPU's kernels, by 4 B c in the host block engine, B its largest block and c the bias
correction), raises ValueError naming the parameter before anything has changed, in any
group. A sparse gradient is a TypeError. A
block whose refactorisations keep failing follows the fallback policy of
:mod:`saddlescape.blocks` and finally raises :class:`saddlescape.NumericalError` naming the
parameter and block; parameters earlier in that step have then taken their step, the failing
one and those after it have not.

Equality with the numpy-level optimizers: on the same gradients, structure "diag" in float64
equals :class:`saddlescape.RMSProp` / :class:`saddlescape.Adam` with structure "diag" bit for bit
on CPU; "block" equals ``saddlescape.RMSProp(structure="block", solver="lowrank")`` over the
same block sizes bit for bit for one tensor, and to the engine's ``tol`` for several (each
tensor's engine staggers its own refreshes).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import weakref
from typing import Any, Callable, Iterable

import numpy as np
import torch

from saddlescape import _core
from saddlescape._validation import choice, integer, real
from saddlescape.blocks import STATE_VERSION as BLOCK_STATE_VERSION
from saddlescape.blocks import BlockEngine, partition

__all__ = ["Adam", "RMSProp", "SaddleEscape"]

_STRUCTURES = ("block", "diag", "full")
_FORMS = ("inv_sqrt", "adam")
_SOLVERS = ("lowrank",)
_ENGINES = ("auto", "host", "device")
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# Options that shape a parameter's state: fixed once the state exists.
_BUILT = ("structure", "form", "block_size", "refresh_every", "solver", "dtype", "tol",
          "max_consecutive_failures", "fallback_eps", "bias_correction", "engine")
# 2: the engine option and the device engine's estimates (version 1 states load, with the
# loading optimizer's engine).
_STATE_VERSION = 2
_LOADABLE_STATES = (1, 2)
_BELOW_ONE = math.nextafter(1.0, 0.0)
# The fused multi-tensor kernels (absent from an older build of the core: torch operations then).
_NATIVE_DIAG = getattr(_core, "diag_rmsprop_step", None)
# The device engine's per-parameter counters (statistics(); saved with the state).
_DEVICE_COUNTERS = ("refreshes", "failed_refreshes", "float64_retries", "eps_retries")
# The device engine's updated copies of estimates, per batched call: bounds the extra device
# memory of a step (a block larger than this is one call of its own).
_CHUNK_BYTES = 1 << 28


def _beta_value(name: str, beta: Any, C: float, lr: float) -> float:
    """The beta of one step: a constant, or 1 - C lr^(2/3) for "auto"."""
    if isinstance(beta, str):
        # lr = 0 (the end of a cosine schedule) would freeze the estimate: the largest beta
        # below 1 instead, as schedules.beta_from_lr does.
        b = min(1.0 - C * lr ** (2.0 / 3.0), _BELOW_ONE)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}='auto' gives 1 - C lr^(2/3) = {b!r} with C = {C!r} and "
                             f"lr = {lr!r}; it must lie in [0, 1) (lower C or lr)")
        return b
    return float(beta)


def _check_beta(name: str, beta: Any) -> Any:
    if isinstance(beta, str):
        if beta != "auto":
            raise ValueError(f"{name} must be a number in [0, 1) or 'auto', got {beta!r}")
        return beta
    b = real(name, beta)
    if not 0.0 <= b < 1.0:
        raise ValueError(f"{name} must be in [0, 1) or 'auto', got {beta!r}")
    return b


def _nonneg(name: str, value: Any) -> float:
    v = real(name, value.item() if isinstance(value, torch.Tensor) else value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def _grad_check(name: str, g: torch.Tensor, a: float, dtype: torch.dtype,
                bound: str = "") -> None:
    """g finite and a g^2 finite in the estimate's dtype, else a ValueError naming the
    parameter (``bound`` says where a comes from, when it is not (1 - beta))."""
    top = float(g.abs().max()) if g.numel() else 0.0
    if not math.isfinite(top):
        bad = (~torch.isfinite(g)).nonzero()[0].tolist()
        raise ValueError(f"the gradient of {name} has a non-finite entry {g[tuple(bad)].item()!r} "
                         f"at index {tuple(bad)}; nothing was changed")
    seen = float(torch.tensor(top, dtype=dtype))  # as the step will see it: rounded to dtype
    if not a * seen * seen <= torch.finfo(dtype).max:
        raise ValueError(f"the gradient of {name} has an entry {top!r} whose square overflows"
                         f"{bound}; nothing was changed")


class _Preconditioned(torch.optim.Optimizer):
    """The machinery RMSProp and Adam share: validation, per-parameter state, the engines, the
    state dict, statistics and the partition."""

    _adam = False
    # Stage block/full steps through host tensors even for CPU parameters: lets the CPU tests
    # run the code path that parameters on a GPU take (the copies aside).
    _host_staging = False
    # Test hook: an object with saddlescape.cuda's API (ema_update_batched, inv_root_apply,
    # rmsprop_diag_step) used instead of saddlescape.cuda for parameters on any device, so that
    # CPU tests run the code path that the device engine takes on a GPU.
    _device_module: Any = None

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._validate(defaults, "the defaults")
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- groups and validation
    def _validate(self, group: dict[str, Any], where: str) -> None:
        group["lr"] = _nonneg(f"lr ({where})", group["lr"])
        if self._adam:
            betas = group["betas"]
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
                raise ValueError(f"betas ({where}) must be a pair (beta1, beta2), got {betas!r}")
            group["betas"] = (_check_beta(f"beta1 ({where})", betas[0]),
                              _check_beta(f"beta2 ({where})", betas[1]))
            if isinstance(group["betas"][0], str):
                raise ValueError(f"beta1 ({where}) must be a number in [0, 1), got 'auto'")
        else:
            group["beta"] = _check_beta(f"beta ({where})", group["beta"])
            group["burn_in"] = integer(f"burn_in ({where})", group["burn_in"])
            if group["burn_in"] < 0:
                raise ValueError(f"burn_in ({where}) must be >= 0, got {group['burn_in']}")
        C = real(f"C ({where})", group["C"])
        if not (math.isfinite(C) and C > 0):
            raise ValueError(f"C ({where}) must be finite and > 0, got {group['C']!r}")
        eps = real(f"eps ({where})", group["eps"])
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps ({where}) must be finite and > 0, got {group['eps']!r}")
        group["C"], group["eps"] = C, eps
        group["weight_decay"] = _nonneg(f"weight_decay ({where})", group["weight_decay"])
        choice(f"structure ({where})", group["structure"], _STRUCTURES)
        choice(f"form ({where})", group["form"], _FORMS)
        choice(f"solver ({where})", group["solver"], _SOLVERS)
        choice(f"engine ({where})", group["engine"], _ENGINES)
        bs = integer(f"block_size ({where})", group["block_size"])
        if bs < 1:
            raise ValueError(f"block_size ({where}) must be >= 1, got {bs}")
        re = integer(f"refresh_every ({where})", group["refresh_every"])
        if not 1 <= re <= 256:
            raise ValueError(f"refresh_every ({where}) must be in [1, 256], got {re}")
        if group["dtype"] not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype ({where}) must be None, torch.float32 or torch.float64, got "
                             f"{group['dtype']!r}")
        if group["tol"] is not None:
            t = real(f"tol ({where})", group["tol"])
            if not 1e-15 <= t < 1.0:
                raise ValueError(f"tol ({where}) must be in [1e-15, 1), got {group['tol']!r}")
        if integer(f"max_consecutive_failures ({where})", group["max_consecutive_failures"]) < 1:
            raise ValueError(f"max_consecutive_failures ({where}) must be >= 1")
        _nonneg(f"fallback_eps ({where})", group["fallback_eps"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"param group {len(self.param_groups)}"
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: parameter {i} is a {type(p).__name__}, not a tensor")
            if p.is_complex():
                raise TypeError(f"{where}: parameter {i} is complex ({p.dtype}); saddlescape's "
                                f"preconditioners are real")
            if p.dtype not in _DTYPES:
                raise TypeError(f"{where}: parameter {i} has dtype {p.dtype}; saddlescape.torch "
                                f"takes float32 and float64 parameters (keep a float32 master "
                                f"copy for half-precision training)")
            if p.layout != torch.strided:
                raise TypeError(f"{where}: parameter {i} has layout {p.layout}; only dense "
                                f"parameters are supported")
        devices = {p.device for g in self.param_groups for p in g["params"]} | {
            p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"{where}: parameters on different devices in one optimizer: "
                             f"{sorted(map(str, devices))}; use one optimizer per device")
        group = dict(param_group)
        group["params"] = params
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate(group, where)
        super().add_param_group(group)

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every parameter that has a gradient; returns closure()'s loss (or None).

        Raises:
            ValueError: a non-finite gradient, an lr < 0, beta='auto' outside [0, 1) (nothing
                has changed).
            TypeError: a sparse gradient.
            NumericalError: a block whose refactorisation failed max_consecutive_failures
                times in a row (see the module docstring).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._advance()
        return loss

    def _advance(self, lr: float | None = None, observe: bool = False) -> None:
        """Every group's step (lr overrides the groups' lr: SaddleEscape's large step;
        observe: update the estimates only, SaddleEscape's hallucinated samples)."""
        work = []
        for gi, group in enumerate(self.param_groups):
            self._step_options(group, gi)
            rate = group["lr"] if lr is None else lr
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            sig = tuple(group[k] for k in _BUILT)
            for p in params:
                g = p.grad
                if g.layout != torch.strided:
                    raise TypeError(f"param group {gi}: sparse gradients are not supported")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(f"{self._name(gi, group, p)}: its gradient is a "
                                     f"{g.dtype} tensor of shape {tuple(g.shape)} on {g.device}")
                st = self.state.get(p)
                if st and st["sig"] != sig:
                    self._check_built(gi, group, st)
            if group["structure"] == "full" and len(params) != len(group["params"]):
                missing = next(i for i, p in enumerate(group["params"]) if p.grad is None)
                raise ValueError(f"param group {gi}: structure 'full' couples all of a group's "
                                 f"parameters, but parameter {missing} has no gradient")
            native = group["structure"] == "diag" and self._native_diag(group, params)
            work.append((gi, group, params, rate, self._betas(group), native))
        # Everything that can be refused is refused before anything changes, in every group
        # (an unusable engine="device" included, by _square_bound): a native diagonal call
        # checks all its tensors before writing, so the first unit of work needs no check of
        # its own when it is one. The weighted gradients checked here are the ones the step
        # reads (_weighted), not formed twice.
        checked: dict[int, torch.Tensor] = {}
        for n, (gi, group, params, rate, betas, native) in enumerate(work):
            if n == 0 and native:
                continue
            wd = group["weight_decay"]
            for p in params:
                # What the step will read: with weight decay g + wd p (non-finite or too large
                # for a parameter after the first would otherwise fail halfway through). The
                # GPU kernels square g before weighting it, so there the bound is g^2 itself.
                g = p.grad.detach()
                if wd:
                    g = checked[id(p)] = g.add(p.detach(), alpha=wd)
                a, bound = self._square_bound(gi, group, p, betas)
                name = self._name(gi, group, p) + (f" plus weight decay {wd!r}" if wd else "")
                _grad_check(name, g, a, self._estimate_dtype(group, p), bound)
        self.__dict__["_checked_grads"] = checked  # for _weighted, during this call only
        try:
            for gi, group, params, rate, betas, native in work:
                if group["structure"] == "diag":
                    self._diag(gi, group, params, rate, betas, observe, native)
                elif group["structure"] == "block":
                    for p in params:
                        self._block(gi, group, p, rate, betas, observe)
                else:
                    self._full(gi, group, params, rate, betas, observe)
        finally:
            del self.__dict__["_checked_grads"]

    def _step_options(self, group: dict[str, Any], gi: int) -> None:
        """The options a step reads (a scheduler or the user may have changed them)."""
        where = f"param group {gi}"
        group["lr"] = _nonneg(f"lr ({where})", group["lr"])
        if self._adam:
            b1, b2 = group["betas"]
            _check_beta(f"beta1 ({where})", b1)
            _check_beta(f"beta2 ({where})", b2)
        else:
            _check_beta(f"beta ({where})", group["beta"])
        for key in ("eps", "C"):
            v = group[key]
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"{key} ({where}) must be finite and > 0, got {v!r}")
        group["weight_decay"] = _nonneg(f"weight_decay ({where})", group["weight_decay"])

    def _square_bound(self, gi: int, group: dict[str, Any], p: torch.Tensor,
                      betas: tuple[float, ...]) -> tuple[float, str]:
        """(a, why) of the bound a g^2 <= max that p's step needs, checked for every parameter
        before any steps: the GPU kernels form g^2 itself (a = 1); the host block engine keeps
        a margin for sums over a block, 4 B c g^2 (B its largest block, c the bias
        correction), and would refuse g only once earlier parameters had stepped; the other
        routes weigh g^2 by 1 - beta first."""
        if group["structure"] == "diag":
            return (1.0 if self._cuda_for(p) is not None else 1.0 - betas[-1]), ""
        head = p if group["structure"] == "block" else group["params"][0]
        st = self.state.get(head)
        if (st and "estimates" in st) or (not st and self._device_engine(gi, group, head)):
            return 1.0, ""
        n = (min(p.numel(), group["block_size"]) if group["structure"] == "block"
             else sum(q.numel() for q in group["params"]))
        product = (st["beta_product"] if st else 1.0) * betas[-1]
        c = 1.0 / (1.0 - product) if (self._adam or group["bias_correction"]) else 1.0
        return 4.0 * n * c, f" in the block engine's bound 4 B c g^2 (B = {n}, c = {c:.3g})"

    def _native_diag(self, group: dict[str, Any], params: list[torch.Tensor]) -> bool:
        """Whether the C++ kernel steps these parameters in one call (CPU, contiguous, the
        estimates in the parameters' dtype, one dtype, one counter state)."""
        if _NATIVE_DIAG is None or self._device_module is not None:
            return False
        p0 = params[0]
        dt = self._estimate_dtype(group, p0)
        keys = set()
        for p in params:
            if (p.device.type != "cpu" or p.dtype != dt or self._estimate_dtype(group, p) != dt
                    or not p.is_contiguous() or not p.grad.is_contiguous()):
                return False
            st = self.state.get(p)
            keys.add((st["steps"], st["moves"], st["beta_product"]) if st else (0, 0, 1.0))
        return len(keys) == 1

    def _betas(self, group: dict[str, Any]) -> tuple[float, ...]:
        """This step's (beta1,) beta: "auto" from the group's lr (not SaddleEscape's r)."""
        if self._adam:
            return (float(group["betas"][0]),
                    _beta_value("beta2", group["betas"][1], float(group["C"]), group["lr"]))
        return (_beta_value("beta", group["beta"], float(group["C"]), group["lr"]),)

    def _name(self, gi: int, group: dict[str, Any], p: torch.Tensor) -> str:
        i = next(k for k, q in enumerate(group["params"]) if q is p)
        return f"parameter {i} of param group {gi} (shape {tuple(p.shape)})"

    def _names(self, gi: int, group: dict[str, Any], params: list[torch.Tensor]) -> str:
        return ", ".join(self._name(gi, group, p) for p in params)

    def _check_built(self, gi: int, group: dict[str, Any], st: dict[str, Any]) -> None:
        for key in _BUILT:
            if st["options"][key] != group[key]:
                raise ValueError(f"param group {gi}: {key} changed from {st['options'][key]!r} to "
                                 f"{group[key]!r} after the state of its parameters was made; "
                                 f"it cannot change during training")

    def _estimate_dtype(self, group: dict[str, Any], p: torch.Tensor) -> torch.dtype:
        return group["dtype"] if group["dtype"] is not None else p.dtype

    def _new_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"options": {k: group[k] for k in _BUILT}, "sig": tuple(group[k] for k in _BUILT),
                "steps": 0, "moves": 0, "beta_product": 1.0}

    def _weighted(self, group: dict[str, Any], p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The gradient with weight decay, in the estimate's dtype (p.grad itself when no
        change is needed: no copy)."""
        g = self.__dict__.get("_checked_grads", {}).get(id(p))
        if g is None:
            g = p.grad.detach()  # backward(create_graph=True) leaves a grad that requires grad
            if group["weight_decay"]:
                g = g.add(p.detach(), alpha=group["weight_decay"])
        return g.to(dtype).contiguous()

    def _moving(self, group: dict[str, Any], st: dict[str, Any], observe: bool) -> bool:
        return not observe and st["steps"] >= group.get("burn_in", 0)

    # ---------------------------------------------------------------- diag
    def _diag(self, gi: int, group: dict[str, Any], params: list[torch.Tensor], lr: float,
              betas: tuple[float, ...], observe: bool, native: bool) -> None:
        fresh = []
        for p in params:
            st = self.state[p]
            if not st:
                st.update(self._new_state(group))
                dt = self._estimate_dtype(group, p)
                st["exp_avg_sq"] = torch.zeros(p.numel(), dtype=dt, device=p.device)
                if self._adam:
                    st["exp_avg"] = torch.zeros(p.numel(), dtype=dt, device=p.device)
                fresh.append(p)
        try:
            if native:
                self._diag_native(group, params, lr, betas, observe)
            else:
                for p in params:
                    self._diag_torch(group, p, lr, betas, observe)
        except BaseException:
            for p in fresh:
                del self.state[p]
            raise
        for p in params:
            st = self.state[p]
            if self._moving(group, st, observe):
                st["moves"] += 1
            st["beta_product"] *= betas[-1]
            st["steps"] += 1

    def _coefficients(self, group: dict[str, Any], st: dict[str, Any], lr: float,
                      betas: tuple[float, ...]) -> tuple[float, float]:
        """(step size, c): lr (Adam: lr / (1 - beta1^t)) and the estimate's bias correction
        c = 1 / (1 - prod beta) (1 without)."""
        product = st["beta_product"] * betas[-1]
        c = 1.0 / (1.0 - product) if (self._adam or group["bias_correction"]) else 1.0
        rate = lr / (1.0 - betas[0] ** (st["moves"] + 1)) if self._adam else lr
        return rate, c

    def _diag_native(self, group: dict[str, Any], params: list[torch.Tensor], lr: float,
                     betas: tuple[float, ...], observe: bool) -> None:
        """One C++ pass over every tensor, on their own memory; it checks every gradient
        before it writes anything."""
        st0 = self.state[params[0]]
        xs, vs, ms = [], [], []
        for p in params:
            x, v, m = self._views(p)
            xs.append(x)
            vs.append(v)
            ms.append(m)
        gs = [p.grad.view(-1).numpy() for p in params]
        rate, c = self._coefficients(group, st0, lr, betas)
        wd = float(group["weight_decay"])
        try:
            if self._adam and self._moving(group, st0, observe):
                _core.diag_adam_step(xs, gs, ms, vs, rate, betas[0], betas[1], group["eps"],
                                     group["form"], wd, c)
            else:
                _core.diag_rmsprop_step(xs, gs, vs, rate, betas[-1], group["eps"], group["form"],
                                        wd, c, self._moving(group, st0, observe))
        except ValueError as e:
            found = re.match(r"gradient (\d+) (.*)", str(e))
            if not found:
                raise
            p = params[int(found.group(1))]
            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            raise ValueError(f"the gradient of {self._name(gi, group, p)} {found.group(2)}") from None

    def _views(self, p: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """numpy views of p and of its estimates, kept between steps (making them costs more
        than the kernel at small sizes) while p's memory and the state tensors are the same."""
        st = self.state[p]
        v, m = st["exp_avg_sq"], st.get("exp_avg")
        ptr = p.data_ptr()
        cache = self.__dict__.get("_view_cache")  # not pickled with the optimizer: made anew
        if cache is None:
            cache = self.__dict__["_view_cache"] = {}
        hit = cache.get(id(p))
        if (hit is not None and hit[0]() is p and hit[1] == ptr and hit[2] is v
                and hit[3] is m):
            return hit[4]
        views = (p.detach().view(-1).numpy(), v.numpy(), None if m is None else m.numpy())
        cache[id(p)] = (weakref.ref(p), ptr, v, m, views)
        return views

    def _diag_torch(self, group: dict[str, Any], p: torch.Tensor, lr: float,
                    betas: tuple[float, ...], observe: bool) -> None:
        """The same update in torch operations (CUDA, mixed dtypes, non-contiguous tensors)."""
        st = self.state[p]
        b = betas[-1]
        v = st["exp_avg_sq"]
        g = self._weighted(group, p, v.dtype).view(-1)
        rate, c = self._coefficients(group, st, lr, betas)
        moving = self._moving(group, st, observe)
        cuda = self._cuda_for(p) if moving and not self._adam and c == 1.0 else None
        if cuda is not None and p.dtype == v.dtype and p.is_contiguous():
            # One fused pass on the device; g (with weight decay) was checked before the step.
            with _on(p.device):
                cuda.rmsprop_diag_step(p.detach().view(-1), g, v, rate, b, group["eps"],
                                       group["form"], check=False)
            return
        v.mul_(b).addcmul_(g, g, value=1.0 - b)
        v.masked_fill_(v < torch.finfo(v.dtype).tiny, 0.0)
        if not moving:
            return
        if self._adam:
            num = st["exp_avg"]
            num.mul_(betas[0]).add_(g, alpha=1.0 - betas[0])
        else:
            num = g
        s = v * c if c != 1.0 else v
        den = (s + group["eps"]).sqrt_() if group["form"] == "inv_sqrt" else s.sqrt().add_(group["eps"])
        p.addcdiv_(num.to(p.dtype).view(p.shape), den.to(p.dtype).view(p.shape), value=-rate)

    # ---------------------------------------------------------------- block and full
    def _engine_for(self, group: dict[str, Any], sizes: list[int], dtype: torch.dtype,
                    beta: float) -> BlockEngine:
        return BlockEngine(sizes, beta=beta, eps=float(group["eps"]), form=group["form"],
                           refresh_every=group["refresh_every"], dtype=_DTYPES[dtype],
                           tol=group["tol"], bias_correction=bool(group["bias_correction"]) or self._adam,
                           max_consecutive_failures=group["max_consecutive_failures"],
                           fallback_eps=float(group["fallback_eps"]))

    def _cuda_for(self, p: torch.Tensor) -> Any:
        """The saddlescape.cuda-like module that can step p where it lives, or None."""
        if self._device_module is not None:
            return self._device_module
        if p.device.type != "cuda":
            return None
        from saddlescape import cuda

        return cuda if cuda.is_available() else None

    def _device_engine(self, gi: int, group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether a new block/full state of p lives on p's device (the engine option);
        engine='device' where it cannot is an error naming the parameter."""
        if group["engine"] == "host":
            return False
        usable = self._cuda_for(p) is not None
        if usable or group["engine"] == "auto":
            return usable
        name = self._name(gi, group, p)
        if p.device.type != "cuda":
            raise ValueError(f"{name}: engine='device' needs CUDA parameters, this one is on "
                             f"{p.device}; use engine='host' or 'auto'")
        from saddlescape import cuda

        raise cuda.CUDAUnavailableError(f"{name}: engine='device': {cuda.unavailable_reason()}")

    def _engine_state(self, gi: int, group: dict[str, Any], head: torch.Tensor, sizes: list[int],
                      beta: float) -> dict[str, Any]:
        """A new block/full state over blocks of these sizes: a host engine, or (n, B, B)
        stacks of zero estimates on the device; Adam's first moment beside it."""
        new = self._new_state(group)
        dt = self._estimate_dtype(group, head)
        home = torch.device("cpu")
        if self._device_engine(gi, group, head):
            home = head.device
            new["estimates"] = [torch.zeros((n, b, b), dtype=dt, device=home)
                                for b, n in _runs(sizes)]
            new.update(dict.fromkeys(_DEVICE_COUNTERS, 0))
        else:
            new["engine"] = self._engine_for(group, sizes, dt, beta)
        if self._adam:
            new["exp_avg"] = torch.zeros(sum(sizes), dtype=dt, device=home)
        return new

    def _block(self, gi: int, group: dict[str, Any], p: torch.Tensor, lr: float,
               betas: tuple[float, ...], observe: bool) -> None:
        st = self.state[p]
        fresh = not st
        if fresh:
            st.update(self._engine_state(gi, group, p, partition(p.numel(), group["block_size"]),
                                         betas[-1]))
        try:
            self._engine_step(gi, group, [p], st, lr, betas, observe)
        except BaseException:
            if fresh:
                del self.state[p]
            raise

    def _full(self, gi: int, group: dict[str, Any], params: list[torch.Tensor], lr: float,
              betas: tuple[float, ...], observe: bool) -> None:
        # The group's state lives with its first parameter.
        head = params[0]
        st = self.state[head]
        fresh = not st
        if fresh:
            st.update(self._engine_state(gi, group, head, [sum(p.numel() for p in params)],
                                         betas[-1]))
        try:
            self._engine_step(gi, group, params, st, lr, betas, observe)
        except BaseException:
            if fresh:
                del self.state[head]
            raise

    def _engine_step(self, gi: int, group: dict[str, Any], params: list[torch.Tensor],
                     st: dict[str, Any], lr: float, betas: tuple[float, ...], observe: bool) -> None:
        move = self._moving(group, st, observe)
        if "engine" in st:
            self._host_step(gi, group, params, st, lr, betas, move)
        else:
            self._device_step(gi, group, params, st, lr, betas, move)
        if move:
            st["moves"] += 1
        st["steps"] += 1
        st["beta_product"] *= betas[-1]

    def _host_step(self, gi: int, group: dict[str, Any], params: list[torch.Tensor],
                   st: dict[str, Any], lr: float, betas: tuple[float, ...], move: bool) -> None:
        engine: BlockEngine = st["engine"]
        dt = torch.float64 if engine.dtype == np.float64 else torch.float32
        engine.set_beta(betas[-1])
        staged = self._host_staging or params[0].device.type != "cpu"
        if len(params) == 1:
            g = self._weighted(group, params[0], dt).view(-1)
        else:
            g = torch.cat([self._weighted(group, p, dt).view(-1) for p in params])
        if staged:
            g = g.to("cpu", copy=True)  # one transfer; the engine reads host memory
        gn = g.numpy()
        try:
            if not move:
                engine.update(gn)
            elif self._adam:
                m = st["exp_avg"]
                m_new = m * betas[0] + g * (1.0 - betas[0])
                mhat = (m_new / (1.0 - betas[0] ** (st["moves"] + 1))).numpy()
                # One call: a block refactored because its low-rank update is unstable keeps
                # the refactorisation (update() then direction() redid it at every step).
                d = engine.update_direction(gn, mhat)
                m.copy_(m_new)
                self._apply(params, torch.from_numpy(d), lr)
            else:
                p = params[0]
                if not staged and len(params) == 1 and p.dtype == dt and p.is_contiguous():
                    engine.step(p.detach().view(-1).numpy(), gn, lr)  # in place, no copies
                else:
                    self._apply(params, torch.from_numpy(engine.update_direction(gn)), lr)
        except _core.NumericalError as e:
            raise _core.NumericalError(f"{self._names(gi, group, params)}: {e}") from e

    def _device_step(self, gi: int, group: dict[str, Any], params: list[torch.Tensor],
                     st: dict[str, Any], lr: float, betas: tuple[float, ...], move: bool) -> None:
        """The device engine's step: f(G_b) v_b by batched eigendecompositions of the updated
        estimates, then the estimates updated in place and the step taken. The directions come
        from updated copies of at most _CHUNK_BYTES of blocks at a time, so that a failure
        leaves everything as it was without a second copy of every estimate; the batched EMA
        update is deterministic, so the committed estimates are those copies bit for bit."""
        cuda = self._cuda_for(params[0])
        if cuda is None:  # a state moved to a device the module cannot reach
            raise ValueError(f"{self._name(gi, group, params[0])}: its state is the device "
                             f"engine's, which cannot run on {params[0].device}")
        stacks: list[torch.Tensor] = st["estimates"]
        dt = stacks[0].dtype
        g = torch.cat([self._weighted(group, p, dt).view(-1) for p in params]) \
            if len(params) > 1 else self._weighted(group, params[0], dt).view(-1)
        rows, offset = [], 0
        for G in stacks:
            n, b = G.shape[0], G.shape[1]
            rows.append(slice(offset, offset + n * b))
            offset += n * b
        beta = betas[-1]
        with _on(params[0].device):
            if not move:  # burn-in or a hallucinated sample: the update alone
                for G, r in zip(stacks, rows):
                    cuda.ema_update_batched(G, g[r].view(G.shape[:2]), beta)
                return
            s = 1.0 - st["beta_product"] * beta if (self._adam or group["bias_correction"]) \
                else 1.0
            if self._adam:
                m_new = st["exp_avg"] * betas[0] + g * (1.0 - betas[0])
                v = m_new / (1.0 - betas[0] ** (st["moves"] + 1))
            else:
                v = g
            counts = {k: st[k] for k in _DEVICE_COUNTERS}
            parts = []
            for G, r in zip(stacks, rows):
                n, b = G.shape[0], G.shape[1]
                gs, vs = g[r].view(n, b), v[r].view(n, b)
                per = max(1, _CHUNK_BYTES // (b * b * G.element_size()))
                for i in range(0, n, per):
                    H = G[i:i + per].clone()
                    cuda.ema_update_batched(H, gs[i:i + per], beta)
                    parts.append(self._device_direction(cuda, gi, group, params, H,
                                                        vs[i:i + per], s, counts).view(-1))
            d = torch.cat(parts) if len(parts) > 1 else parts[0]
            if not bool(torch.isfinite(d).all()):
                raise _core.NumericalError(f"{self._names(gi, group, params)}: the "
                                           f"preconditioned direction is not finite; nothing "
                                           f"was changed")
            for G, r in zip(stacks, rows):
                cuda.ema_update_batched(G, g[r].view(G.shape[:2]), beta)
            self._apply(params, d, lr, checked=True)
            if self._adam:
                st["exp_avg"].copy_(m_new)
        counts["refreshes"] += 1
        st.update(counts)

    def _device_direction(self, cuda: Any, gi: int, group: dict[str, Any],
                          params: list[torch.Tensor], G: torch.Tensor, V: torch.Tensor, s: float,
                          counts: dict[str, int]) -> torch.Tensor:
        """f(G_b / s) v_b for a stack: s^(1/2) f(G_b) with eps scaled, retried in float64
        (one block at a time) and then with fallback_eps when the eigensolver fails."""
        form = group["form"]
        scale = s if form == "inv_sqrt" else math.sqrt(s)
        eps = float(group["eps"]) * scale
        try:
            out = cuda.inv_root_apply(G, V, eps, 2, form)
        except _core.NumericalError as first:
            counts["failed_refreshes"] += 1
            out = None
            tries = [(eps, "float64_retries")]
            if group["fallback_eps"] > 0:
                tries.append((eps + float(group["fallback_eps"]) * scale, "eps_retries"))
            for e, key in tries:
                counts[key] += 1
                try:
                    out = cuda.inv_root_apply(G.double(), V.double(), e, 2, form,
                                              method="divide_conquer").to(G.dtype)
                    break
                except _core.NumericalError:
                    continue
            if out is None:
                raise _core.NumericalError(
                    f"{self._names(gi, group, params)}: the eigendecomposition of a block of "
                    f"size {G.shape[-1]} failed ({first}), also in float64"
                    + (" and with fallback_eps" if len(tries) > 1 else "")
                    + "; nothing was changed") from first
        return out * math.sqrt(s) if s != 1.0 else out

    @staticmethod
    def _apply(params: list[torch.Tensor], direction: torch.Tensor, lr: float,
               checked: bool = False) -> None:
        if not checked and not bool(torch.isfinite(direction).all()):
            raise _core.NumericalError("the preconditioned direction is not finite; the "
                                       "parameters are unchanged")
        direction = direction.to(device=params[0].device)  # one transfer for a host engine
        offset = 0
        for p in params:
            n = p.numel()
            p.add_(direction[offset:offset + n].to(p.dtype).view(p.shape), alpha=-lr)
            offset += n

    # ---------------------------------------------------------------- introspection
    def partition(self) -> list[dict[str, Any]]:
        """How the parameters map to preconditioner blocks: one entry per parameter with
        ``group``, ``index`` (in the group), ``shape``, ``numel``, ``structure`` and
        ``block_sizes`` (diag: every entry its own 1 x 1 block, given as []; full: the group's
        single block, listed on the group's first parameter and [] on the others)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            total = sum(p.numel() for p in group["params"])
            for i, p in enumerate(group["params"]):
                s = group["structure"]
                sizes = (partition(p.numel(), group["block_size"]) if s == "block" else
                         [total] if s == "full" and i == 0 else [])
                out.append({"group": gi, "index": i, "shape": tuple(p.shape), "numel": p.numel(),
                            "structure": s, "block_sizes": sizes})
        return out

    def statistics(self) -> dict[str, Any]:
        """Figures worth logging, as plain numbers: ``blocks`` (preconditioner blocks with a
        state), ``lambda_min`` / ``lambda_max`` over them (of G at each block's last refresh;
        for diag entries of v), ``condition_max`` and ``condition_median`` of
        (lambda_max + eps) / (lambda_min + eps) per block (diag: over each tensor's entries),
        and the totals ``refreshes``, ``failed_refreshes``, ``float64_retries``,
        ``eps_retries``, ``kept_bases``; ``per_parameter`` has one dict per parameter with
        a state (group, index, and its block lists). For the device engine the eigenvalues are
        the current estimate's, computed by this call (one batched eigvalsh per stack), every
        step that moves counts as a refresh of each block, and its failure counters count
        calls over a stack."""
        lo, hi, cond = [], [], []
        totals = dict.fromkeys(("refreshes", "failed_refreshes", "float64_retries", "eps_retries",
                                "kept_bases"), 0)
        per = []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st:
                    continue
                eps = float(group["eps"])
                if "engine" in st:
                    s = st["engine"].statistics()
                    lo += s["lambda_min"]
                    hi += s["lambda_max"]
                    cond += s["condition"]
                    for k in totals:
                        totals[k] += s[f"total_{k}"]
                    per.append({"group": gi, "index": i, "lambda_min": list(s["lambda_min"]),
                                "lambda_max": list(s["lambda_max"]),
                                "condition": list(s["condition"]),
                                "refreshes": list(s["refreshes"]),
                                "kept_bases": list(s["kept_bases"])})
                elif "estimates" in st:
                    a, b = self._device_spectrum(group, st)
                    c = [(y + eps) / (x + eps) for x, y in zip(a, b)]
                    lo += a
                    hi += b
                    cond += c
                    for k in _DEVICE_COUNTERS:
                        totals[k] += st[k] * (len(a) if k == "refreshes" else 1)
                    per.append({"group": gi, "index": i, "lambda_min": a, "lambda_max": b,
                                "condition": c, "refreshes": [st["refreshes"]] * len(a),
                                "kept_bases": [0] * len(a)})
                else:
                    v = st["exp_avg_sq"]
                    a, b = float(v.min()), float(v.max())
                    lo.append(a)
                    hi.append(b)
                    cond.append((b + eps) / (a + eps))
                    per.append({"group": gi, "index": i, "lambda_min": [a], "lambda_max": [b],
                                "condition": [cond[-1]]})
        out: dict[str, Any] = {"blocks": sum(len(q["lambda_min"]) for q in per
                                             if "refreshes" in q) or len(per)}
        out["lambda_min"] = float(min(lo)) if lo else float("nan")
        out["lambda_max"] = float(max(hi)) if hi else float("nan")
        out["condition_max"] = float(max(cond)) if cond else float("nan")
        out["condition_median"] = float(np.median(cond)) if cond else float("nan")
        out.update({k: int(v) for k, v in totals.items()})
        out["per_parameter"] = per
        return out

    def _device_spectrum(self, group: dict[str, Any],
                         st: dict[str, Any]) -> tuple[list[float], list[float]]:
        """Each block's smallest and largest eigenvalue of the device engine's current
        estimate (bias-corrected where the step corrects it), computed now on the device."""
        c = 1.0
        if (self._adam or group["bias_correction"]) and st["beta_product"] < 1.0:
            c = 1.0 / (1.0 - st["beta_product"])
        lo: list[float] = []
        hi: list[float] = []
        for G in st["estimates"]:
            per = max(1, _CHUNK_BYTES // (G.shape[1] * G.shape[1] * 8))
            for i in range(0, G.shape[0], per):  # float64 copies of a chunk at a time
                ev = torch.linalg.eigvalsh(G[i:i + per].double()).clamp_(min=0.0) * c
                lo += ev[:, 0].tolist()
                hi += ev[:, -1].tolist()
        return lo, hi

    def _inject_refresh_failures(self, param: torch.Tensor, block: int, attempts: int,
                                 stages: int = 3) -> None:
        """Test hook: the fallback policy's failure injection on one parameter's engine
        (see :meth:`saddlescape.BlockEngine._inject_refresh_failures`)."""
        st = self.state.get(param)
        if not st or "engine" not in st:
            raise ValueError("that parameter has no host block engine (take a step first; the "
                             "device engine has no failure injection)")
        st["engine"]._inject_refresh_failures(block, attempts, stages)

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout (``state`` keyed by parameter index, ``param_groups``), every
        value a tensor or a plain Python value, so that ``torch.save`` / ``torch.load``
        (``weights_only=True`` included) round-trip it; an engine is saved as its complete
        state, so a fresh optimizer that loads it continues bit for bit. The device engine's
        estimates are copied to host memory (its other tensors stay on their device: load
        with ``torch.load(..., map_location="cpu")`` where there is no GPU)."""
        base = super().state_dict()
        out = {}
        for k, st in base["state"].items():
            # The device engine's estimates go to host memory: a GPU copy of the largest thing
            # on the GPU could exhaust it, and they need no GPU to be loaded.
            e = {key: _cloned(val, torch.device("cpu") if key == "estimates" else None)
                 for key, val in st.items() if key not in ("engine", "sig")}
            e["options"] = _plain_options(st["options"])
            if "engine" in st:
                es = st["engine"].state_dict()
                es["data"] = torch.from_numpy(np.array(es["data"]))
                es["scalars"] = torch.from_numpy(np.array(es["scalars"]))
                e["engine"] = es
            out[k] = e
        groups = []
        for g in base["param_groups"]:
            g = dict(g)
            g["dtype"] = _dtype_name(g["dtype"])
            groups.append(g)
        return {"state": out, "param_groups": groups, "saddlescape": _STATE_VERSION,
                "kind": type(self).__name__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` of an optimizer of the same class over parameters of
        the same shapes; the groups' options come from the saved dict, except ``engine``:
        where to compute is this optimizer's choice, and a block/full state saved by the other
        engine is converted (host to device: the estimates G_b, summed from the saved
        factorisation and gradient history in float64; device to host: each block refreshed
        at its estimate by a float64 eigendecomposition, on the saved refresh schedule). A
        converted state continues to rounding, an unconverted one bit for bit. Tensors keep their
        saved dtype (no cast to the parameter's, unlike torch.optim's default, so that float64
        estimates of float32 parameters survive).

        Raises:
            ValueError: naming what does not match, or engine='device' for parameters not on a
                GPU; nothing has changed then.
            CUDAUnavailableError: engine='device' on a GPU that saddlescape.cuda cannot use
                (the reason given); nothing has changed.
        """
        if not isinstance(state_dict, dict) or state_dict.get("kind") != type(self).__name__:
            raise ValueError(f"not a saddlescape.torch.{type(self).__name__} state_dict (its "
                             f"kind is {state_dict.get('kind') if isinstance(state_dict, dict) else None!r})")
        if state_dict.get("saddlescape") not in _LOADABLE_STATES:
            raise ValueError(f"unsupported state version {state_dict.get('saddlescape')!r}")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"the state has {len(saved)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        by_id: dict[int, torch.Tensor] = {}
        groups = []
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
            if len(theirs["params"]) != len(mine["params"]):
                raise ValueError(f"param group {gi} has {len(mine['params'])} parameters, the "
                                 f"state's {len(theirs['params'])}")
            g = {k: v for k, v in theirs.items() if k != "params"}
            g["engine"] = mine["engine"]  # where to compute: this optimizer's choice
            g["dtype"] = _dtype_from(g["dtype"])
            g["params"] = mine["params"]
            self._validate(g, f"the state's param group {gi}")
            groups.append(g)
            by_id.update(zip(theirs["params"], mine["params"]))
        owner = {id(p): (gi, g) for gi, g in enumerate(groups) for p in g["params"]}
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for k, st in state_dict["state"].items():
            if k not in by_id:
                raise ValueError(f"the state names parameter {k!r}, which no param group has")
            p = by_id[k]
            new_state[p] = self._import(*owner[id(p)], p, st, k)
        self.state.clear()
        self.state.update(new_state)
        for mine, g in zip(self.param_groups, groups):
            mine.clear()
            mine.update(g)

    def _import(self, gi: int, group: dict[str, Any], p: torch.Tensor, st: dict[str, Any],
                k: Any) -> dict[str, Any]:
        out = {key: _cloned(val, p.device if group["structure"] == "diag" else None)
               for key, val in st.items() if key != "engine"}
        out["options"] = dict(out["options"])
        # Where it computes is this optimizer's choice (see load_state_dict), not the state's.
        out["options"]["engine"] = group["engine"]
        out["options"]["dtype"] = _dtype_from(out["options"]["dtype"])
        out["sig"] = tuple(out["options"].get(k) for k in _BUILT)
        for key in _BUILT:
            if out["options"].get(key) != group[key]:
                raise ValueError(f"parameter {k}'s state was made with {key} = "
                                 f"{out['options'].get(key)!r}, its group says {group[key]!r}")
        dt = self._estimate_dtype(group, p)
        if group["structure"] == "diag":
            n = p.numel()
            for key in ("exp_avg_sq",) + (("exp_avg",) if self._adam else ()):
                t = out.get(key)
                if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.dtype != dt:
                    raise ValueError(f"parameter {k}'s {key} must be a {dt} tensor of {n} entries")
            return out
        sizes = ([sum(q.numel() for q in group["params"])] if group["structure"] == "full"
                 else partition(p.numel(), group["block_size"]))
        on_device = self._device_engine(gi, group, p)
        if self._adam:
            m = out.get("exp_avg")
            if not isinstance(m, torch.Tensor) or m.shape != (sum(sizes),) or m.dtype != dt:
                raise ValueError(f"parameter {k}'s exp_avg must be a {dt} tensor of "
                                 f"{sum(sizes)} entries")
            out["exp_avg"] = m.to(p.device if on_device else torch.device("cpu"))
        if "estimates" in st:
            stacks = self._saved_estimates(out, sizes, dt, k)
            for key in _DEVICE_COUNTERS:
                del out[key]
            del out["estimates"]
        else:
            es = dict(st["engine"])
            es["data"] = es["data"].cpu().numpy()  # torch.load(map_location="cuda") puts it there
            es["scalars"] = es["scalars"].cpu().numpy()
            engine = self._engine_for(group, sizes, dt, 0.0)
            engine.load_state_dict(es)  # checks the saved engine against these blocks
            if not on_device:
                out["engine"] = engine
                return out
            stacks = _estimate_stacks(es, sizes, engine.refresh_every, dt)
        if on_device:
            out["estimates"] = [G.to(p.device).contiguous() for G in stacks]
            out.update({key: int(st.get(key, 0)) for key in _DEVICE_COUNTERS})
        else:
            engine = self._engine_for(group, sizes, dt, 0.0)
            engine.load_state_dict(_refreshed_engine_state(stacks, sizes, engine, out["steps"],
                                                           out["beta_product"]))
            out["engine"] = engine
        return out

    def _saved_estimates(self, out: dict[str, Any], sizes: list[int], dt: torch.dtype,
                         k: Any) -> list[torch.Tensor]:
        """A device engine's saved estimates and counters, checked against the blocks."""
        want = [(n, b, b) for b, n in _runs(sizes)]
        stacks = out["estimates"]
        if (not isinstance(stacks, list) or [tuple(getattr(G, "shape", ())) for G in stacks] != want
                or any(not isinstance(G, torch.Tensor) or G.dtype != dt for G in stacks)):
            raise ValueError(f"parameter {k}'s estimates must be {dt} tensors of shapes {want}")
        if not all(bool(torch.isfinite(G).all()) and torch.equal(G, G.mT) for G in stacks):
            raise ValueError(f"parameter {k}'s estimates must be finite and symmetric")
        for key in _DEVICE_COUNTERS:
            if not isinstance(out.get(key), int) or out[key] < 0:
                raise ValueError(f"parameter {k}'s {key} must be an integer >= 0")
        return stacks


def _runs(sizes: list[int]) -> list[tuple[int, int]]:
    """(block size, count) of each run of equal consecutive sizes: the device engine's stacks
    (a partition has at most two, the full blocks and the rest)."""
    runs: list[tuple[int, int]] = []
    for b in sizes:
        if runs and runs[-1][0] == b:
            runs[-1] = (b, runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


# The host engine's saved layout (BlockEngine.state_dict, C++ block_engine::save): per block
# S and V (n x n, column-major; S's lower triangle is the estimate at the last refresh), then the
# gradient history H and its rotation U (refresh_every x n each); scalars per block gamma, the
# history's weights (refresh_every), lambda (n) and the counters, since and k first.
def _estimate_stacks(es: dict[str, Any], sizes: list[int], R: int,
                     dt: torch.dtype) -> list[torch.Tensor]:
    """The estimates G_b = gamma S_b + sum_i w_i h_i h_i^T (unscaled) of a host engine's
    state, summed in float64 and rounded once, as the device engine's (n, B, B) stacks."""
    data, scalars = np.asarray(es["data"], np.float64), np.asarray(es["scalars"], np.float64)
    counters = (scalars.size - sum(1 + R + n for n in sizes)) // len(sizes)
    Gs, at, sat = [], 0, 0
    for n in sizes:
        S = np.tril(data[at:at + n * n].reshape(n, n).T)
        H = data[at + 2 * n * n:at + 2 * n * n + R * n].reshape(R, n)
        gamma, w = scalars[sat], scalars[sat + 1:sat + 1 + R]
        k = int(scalars[sat + 1 + R + n + 1])
        L = np.tril(gamma * S + (H[:k].T * w[:k]) @ H[:k])
        Gs.append(L + np.tril(L, -1).T)  # one triangle, mirrored: exactly symmetric
        at += 2 * n * n + 2 * R * n
        sat += 1 + R + n + counters
    out, i = [], 0
    for _, count in _runs(sizes):
        out.append(torch.from_numpy(np.stack(Gs[i:i + count])).to(dt))
        i += count
    return out


def _refreshed_engine_state(stacks: list[torch.Tensor], sizes: list[int], engine: BlockEngine,
                  updates: int, beta_product: float) -> dict[str, Any]:
    """A host engine's state whose blocks were refreshed at the given estimates (eigh in
    float64), on the refresh schedule of an engine that has made ``updates`` updates."""
    R = engine.refresh_every
    data, scalars = [], []
    b = 0
    for stack in stacks:
        for G in stack.detach().cpu().double().numpy():
            n = G.shape[0]
            lam, V = np.linalg.eigh(G)
            # the engine's own refresh: eigenvalues within n u lambda_max of zero are zero
            lam[lam <= n * np.finfo(engine.dtype).eps * max(lam.max(), 0.0)] = 0.0
            data += [np.tril(G).ravel(order="F"), V.ravel(order="F"), np.zeros(2 * R * n)]
            # since: block b acts as refreshed (b + updates) mod R updates ago, the stagger
            scalars += [[1.0], np.zeros(R), lam,
                        [float((b + updates) % R)], np.zeros(9)]
            b += 1
    return {"version": BLOCK_STATE_VERSION, "kind": "BlockEngine", "block_sizes": sizes,
            "refresh_every": R,
            "dtype": str(engine.dtype), "updates": int(updates),
            "beta_product": float(beta_product) if updates else 1.0,
            "data": np.concatenate(data).astype(engine.dtype),
            "scalars": np.concatenate(scalars)}


def _on(device: torch.device) -> Any:
    """Makes a CUDA parameter's device current (saddlescape.cuda works on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _cloned(val: Any, device: torch.device | None = None) -> Any:
    """A copy of a state entry (tensors, lists of tensors, plain values), tensors moved to
    ``device`` when given."""
    if isinstance(val, torch.Tensor):
        # straight to the device: a clone first would hold a second copy where it was
        return val.detach().clone() if device is None else val.detach().to(device, copy=True)
    if isinstance(val, list):
        return [_cloned(v, device) for v in val]
    return copy.deepcopy(val)


def _dtype_name(dt: Any) -> Any:
    return None if dt is None else str(dt).replace("torch.", "")


def _dtype_from(name: Any) -> Any:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name in ("float32", "float64"):
        return getattr(torch, name)
    raise ValueError(f"dtype {name!r} in the state is not float32, float64 or None")


def _plain_options(options: dict[str, Any]) -> dict[str, Any]:
    o = dict(options)
    o["dtype"] = _dtype_name(o["dtype"])
    return o


class RMSProp(_Preconditioned):
    """RMSProp of the paper (Algorithms 2 and 3) on torch parameters: diagonal, block or full.

    Args:
        params: parameters or param groups (dicts with any of the options below).
        lr: step size (>= 0), read from the group at every step.
        beta: EMA weight in [0, 1), or "auto" for 1 - C lr^(2/3) at each step.
        eps: damping, > 0.
        C: the constant of beta="auto" (Sec. 5.4 uses C = 1).
        structure: "block" (default), "diag" or "full"; see the module docstring.
        form: "inv_sqrt" ((G + eps I)^(-1/2), the paper's) or "adam" ((G^(1/2) + eps I)^(-1)).
        block_size: the largest block (structure "block").
        burn_in: steps per parameter that update its estimate only.
        refresh_every: the eigendecomposition period of each block (1 to 256); directions are
            exact at every step regardless (solver "lowrank").
        solver: "lowrank" (exact directions between staggered refreshes).
        bias_correction: divide the estimate by 1 - prod beta_t.
        weight_decay: L2 penalty added to the gradient (g + wd p), as torch.optim's.
        dtype: the estimates' dtype (None: each parameter's).
        tol: the block engine's relative accuracy (None: 1e-10 float64, 1e-6 float32).
        max_consecutive_failures, fallback_eps: the block engine's fallback policy.
        engine: where "block" and "full" compute: "auto", "host" or "device" (see the module
            docstring).

    Raises:
        ValueError: a bad option (named, with its group); TypeError: a parameter that is not a
            float32/float64 dense real tensor.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, beta: float | str = 0.99,
                 eps: float = 1e-8, *, C: float = 1.0, structure: str = "block",
                 form: str = "inv_sqrt", block_size: int = 256, burn_in: int = 0,
                 refresh_every: int = 16, solver: str = "lowrank", bias_correction: bool = False,
                 weight_decay: float = 0.0, dtype: torch.dtype | None = None,
                 tol: float | None = None, max_consecutive_failures: int = 3,
                 fallback_eps: float = 0.0, engine: str = "auto") -> None:
        defaults = dict(lr=lr, beta=beta, eps=eps, C=C, structure=structure, form=form,
                        block_size=block_size, burn_in=burn_in, refresh_every=refresh_every,
                        solver=solver, bias_correction=bias_correction,
                        weight_decay=weight_decay, dtype=dtype, tol=tol,
                        max_consecutive_failures=max_consecutive_failures,
                        fallback_eps=fallback_eps, engine=engine)
        super().__init__(params, defaults)


class Adam(_Preconditioned):
    """Adam with a diagonal, block or full second moment.

    m <- beta1 m + (1 - beta1) g, G the EMA of g g^T with beta2 (as :class:`RMSProp`'s), and
    p <- p - lr f(G / (1 - prod beta2)) m / (1 - beta1^t), t the parameter's moving steps,
    f of ``form`` ("adam": (G^(1/2) + eps I)^(-1), Adam's own; "inv_sqrt":
    (G + eps I)^(-1/2)). ``betas=(beta1, "auto")`` ties beta2 to the lr as RMSProp's
    beta="auto". Default structure "diag" is torch.optim.Adam's update (with its eps
    placement). Other options as :class:`RMSProp`'s.
    """

    _adam = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float | str] = (0.9, 0.999), eps: float = 1e-8, *,
                 C: float = 1.0, structure: str = "diag", form: str = "adam",
                 block_size: int = 256, refresh_every: int = 16, solver: str = "lowrank",
                 weight_decay: float = 0.0, dtype: torch.dtype | None = None,
                 tol: float | None = None, max_consecutive_failures: int = 3,
                 fallback_eps: float = 0.0, engine: str = "auto") -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, C=C, structure=structure, form=form,
                        block_size=block_size, refresh_every=refresh_every, solver=solver,
                        bias_correction=True, weight_decay=weight_decay, dtype=dtype, tol=tol,
                        max_consecutive_failures=max_consecutive_failures,
                        fallback_eps=fallback_eps, engine=engine)
        super().__init__(params, defaults)


class SaddleEscape:
    """Algorithm 4 on a model: the step size is ``r`` at the steps t with t mod t_thresh == 0
    (t counting the steps that move the parameters, from 0, so the first is a large step),
    the groups' lr otherwise.

    With ``hallucinate = S > 0``, after each large step from x_t to x_(t+1) the base's
    estimates are fed the gradients at x_t + (k / S)(x_(t+1) - x_t), k = 1..S (the parameters
    are set there, ``closure()`` recomputes the gradients, the estimate is updated without a
    step), so that as far as the estimator sees no step is longer than about r / S; then the
    parameters are x_(t+1) again and their ``.grad`` is the gradient at x_t. This needs
    ``step(closure)``, where the closure zeroes the gradients, computes the loss and calls
    backward, as torch.optim's closures do.

    Args:
        optimizer: a :class:`RMSProp` or :class:`Adam` (used, not copied: step it only
            through this wrapper).
        r: the large step size, > 0.
        t_thresh: the period of large steps, >= 1.
        hallucinate: S >= 0.

    ``param_groups``, ``zero_grad`` and ``state`` are the base's; ``state_dict`` holds the
    base's and this wrapper's step count.
    """

    def __init__(self, optimizer: _Preconditioned, r: float, t_thresh: int,
                 hallucinate: int = 0) -> None:
        if not isinstance(optimizer, _Preconditioned):
            raise ValueError(f"optimizer must be a saddlescape.torch RMSProp or Adam, got "
                             f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.r = real("r", r)
        if not (math.isfinite(self.r) and self.r > 0):
            raise ValueError(f"r must be finite and > 0, got {r!r}")
        self.t_thresh = integer("t_thresh", t_thresh)
        if self.t_thresh < 1:
            raise ValueError(f"t_thresh must be >= 1, got {t_thresh!r}")
        self.hallucinate = integer("hallucinate", hallucinate)
        if self.hallucinate < 0:
            raise ValueError(f"hallucinate must be >= 0, got {hallucinate!r}")
        self.moves = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _in_burn_in(self) -> bool:
        opt = self.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None and opt.state.get(p, {}).get("steps", 0) < group.get("burn_in", 0):
                    return True
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step (large when due); returns closure()'s loss.

        Raises:
            ValueError: hallucinate > 0 without a closure (before anything changes), and the
                base's errors.
        """
        if self.hallucinate > 0 and closure is None:
            raise ValueError(f"SaddleEscape with hallucinate = {self.hallucinate} needs "
                             f"step(closure): the hallucinated samples are gradients at points "
                             f"along each large step, which only a closure can compute")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        opt = self.optimizer
        if self._in_burn_in():
            opt._advance()
            return loss
        if self.moves % self.t_thresh != 0:
            opt._advance()
            self.moves += 1
            return loss
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        before = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]
        opt._advance(lr=self.r)
        self.moves += 1  # the step has happened; the samples below may fail
        after = [p.detach().clone() for p in params]
        try:
            for k in range(1, self.hallucinate + 1):
                s = k / self.hallucinate
                for p, x0, x1 in zip(params, before, after):
                    p.copy_(x0 + s * (x1 - x0))
                with torch.enable_grad():
                    closure()
                opt._advance(observe=True)
        finally:
            for p, x1, g in zip(params, after, grads):
                p.copy_(x1)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "moves": self.moves,
                "r": self.r, "t_thresh": self.t_thresh, "hallucinate": self.hallucinate}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; r, t_thresh and hallucinate must match this wrapper's."""
        if not isinstance(state_dict, dict) or "optimizer" not in state_dict:
            raise ValueError("not a SaddleEscape state_dict")
        for key in ("r", "t_thresh", "hallucinate"):
            if state_dict.get(key) != getattr(self, key):
                raise ValueError(f"the state's {key} is {state_dict.get(key)!r}, this "
                                 f"SaddleEscape's {getattr(self, key)!r}")
        moves = integer("moves", state_dict["moves"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.moves = moves
