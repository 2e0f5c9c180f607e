"""Shared helpers of the saddlescape.torch tests: parameters, gradient sequences with scales over
six decades or confined to subspaces (rank-deficient estimates), and runs of an optimizer.
"""

from __future__ import annotations

import numpy as np
import torch

SHAPES = [(4, 3), (3,), (), (2, 5)]  # 12 + 3 + 1 + 10 = 26 entries, a 0-d parameter included


def _params(shapes=SHAPES, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _gradients(n, d, steps, seed=1, rank=None, decades=3):
    """Gradients with entries of scales 10^-decades..10^decades; rank: confined to a subspace
    of that dimension (a rank-deficient second moment)."""
    rng = np.random.default_rng(seed)
    scale = np.logspace(-decades, decades, d)
    rng.shuffle(scale)
    if rank is None:
        return rng.standard_normal((steps, d)) * scale
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    return (rng.standard_normal((steps, rank)) @ basis.T) * scale


def _set_grads(params, flat):
    offset = 0
    for p in params:
        n = p.numel()
        g = torch.from_numpy(np.ascontiguousarray(flat[offset:offset + n])).reshape(p.shape)
        p.grad = g.to(device=p.device, dtype=p.dtype)
        offset += n


def _flat(params):
    return np.concatenate([p.detach().cpu().double().reshape(-1).numpy() for p in params])


def _run(opt, params, gs):
    out = []
    for g in gs:
        _set_grads(params, g)
        opt.step()
        out.append(_flat(params))
    return np.array(out)


def _reference(numpy_opt, x0, gs):
    x = x0.copy()
    out = []
    for g in gs:
        numpy_opt.step(x, g)
        out.append(x.copy())
    return np.array(out)


def _assert_close(got, want, rtol):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _run_inverse_sqrt(opt, params, gs):
    """_run under LambdaLR's lr_t = lr_0 / sqrt(t + 1): saddlescape's inverse_sqrt schedule."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / np.sqrt(t + 1.0))
    out = []
    for g in gs:
        _set_grads(params, g)
        opt.step()
        sched.step()
        out.append(_flat(params))
    return np.array(out)


def _cuda_against_cpu(make, gs, rtol):
    """The same gradients through make(CPU parameters) and make(their CUDA copies); returns
    both optimizers and the CUDA parameters after checking they agree to rtol."""
    a = _params()
    b = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    oa, ob = make(a), make(b)
    for g in gs:
        _set_grads(a, g)
        oa.step()
        for q, src in zip(b, a):
            q.grad = src.grad.cuda()
        ob.step()
    _assert_close(np.concatenate([q.detach().cpu().reshape(-1).numpy() for q in b]), _flat(a),
                  rtol)
    return oa, ob, b
