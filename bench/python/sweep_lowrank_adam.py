"""Worst relative error of the block engine's adam-form direction for a size-1 block (exact:
g / (sqrt(G) + eps)) over eps, gradient scale and refresh_every; the check behind the adam
quadrature fix recorded in bench/RESULTS.md (issue 15). Prints (error, (eps, scale, R, step)).

    python bench/python/sweep_lowrank_adam.py
"""

import numpy as np

import saddlescape

rng = np.random.default_rng(0)
worst = (0.0, None)
for eps in [1e-8, 1e-4, 1e-2, 1.0, 10.0, 1e3]:
    for scale in [1e-6, 1e-3, 1.0, 1e3, 1e6]:
        for R in [1, 4, 16]:
            e = saddlescape.BlockEngine([1, 3], beta=0.9, eps=eps, form="adam",
                                        refresh_every=R, dtype=np.float64)
            G = 0.0
            for t in range(20):
                g = rng.standard_normal(4) * scale
                d = e.update_direction(g)
                G = 0.9 * G + 0.1 * g[0] ** 2
                ref = g[0] / (np.sqrt(G) + eps)
                err = abs(d[0] - ref) / abs(ref)
                if err > worst[0]:
                    worst = (err, (eps, scale, R, t))
print(worst)
