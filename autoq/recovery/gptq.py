"""GPTQ (Frantar et al. 2023) on a fixed grid: a MatMul's weights rounded one input row at a time, each row's
rounding error pushed onto the rows not rounded yet through the inverse of the inputs' second moment (X^T X), so
the layer's output error on the calibration inputs stays small. Rows go in order of their input's energy
("act order"); the grid (each block's scale, and zero point where it has one) is fixed before, from the weights as
they are, so the result lies on the grid the backend stores: the learned-rounding cache and builds take it as they
take AdaRound's. No gradient steps: one Cholesky factor and one pass over the rows, about a second for a
1536-input Linear on 2 cores where AdaRound's 500 steps take several."""

from __future__ import annotations

import numpy as np

DAMP = 0.3  # added to the diagonal, times its mean. The calibration holds few tokens (SmolLM2's demo: 1,229 fitted
# on for 1,536-input layers): with GPTQ's usual 0.01 the down projections fitted those tokens and not the held-out
# ones (error ratio to round-to-nearest 1.00-1.27); 0.3 was best of 0.01-1 on held-out tokens (1.50-2.10)
BLOCK = 128  # rows rounded together before the rest is updated (the result does not depend on it)


def solve(w: np.ndarray, x: np.ndarray, scale: np.ndarray, low: int | np.ndarray, high: int | np.ndarray,
          keep: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """The integers GPTQ picks for `w` (inputs, outputs) on the grid `scale` x [`low`, `high`] (per weight or
    scalars), given the layer's inputs `x` (tokens, inputs). Where `keep` is set the integer is `fixed` (the
    weights that set a block's scale stay where round-to-nearest puts them, so a quantizer finds the same scales);
    their rounding error is still passed on."""
    n = w.shape[0]
    h = x.T.astype(np.float64) @ x.astype(np.float64)
    diag = np.diag(h).copy()
    h[np.arange(n), np.arange(n)] = np.where(diag > 0, diag, 1.0) + DAMP * max(float(diag.mean()), 1e-12)
    order = np.argsort(-np.diag(h), kind="stable")
    upper = np.linalg.cholesky(np.linalg.inv(h[order][:, order])).T  # the inverse's upper Cholesky factor

    def rows(a: int | np.ndarray) -> np.ndarray:
        return np.broadcast_to(a, w.shape)[order]

    rest, s, lo, hi, kept, at = (rows(a).astype(np.float64) for a in (w, scale, low, high, keep, fixed))
    rest = rest.copy()
    chosen = np.empty_like(rest)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        errors = np.empty((stop - start, w.shape[1]))
        for i in range(start, stop):
            q = np.where(kept[i] > 0, at[i], np.clip(np.round(rest[i] / s[i]), lo[i], hi[i]))
            chosen[i] = q
            errors[i - start] = (rest[i] - q * s[i]) / upper[i, i]
            rest[i + 1:stop] -= np.outer(upper[i, i + 1:stop], errors[i - start])
        rest[stop:] -= upper[start:stop, stop:].T @ errors
    integers = np.empty_like(chosen)
    integers[order] = chosen
    return integers
