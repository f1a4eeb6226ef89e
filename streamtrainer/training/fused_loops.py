"""Compiled per-record training loop: forward, loss, backward and optimizer step in one pass.

This is the numba kernel behind :mod:`streamtrainer.training.kernels`, which
checks that a model and optimizer fit it and hands it numpy views of the torch
tensors. Everything here works on plain arrays and updates them in place:

* parameters are flat float32 arrays in torch layout (``weight`` ``(out, in)``
  row-major, ``bias`` ``(out,)``): ``w1, b1`` of the hidden layer (empty for a
  plain linear model) and ``w2, b2`` of the output layer;
* optimizer state is two float32 arrays per parameter (Adam: ``exp_avg``,
  ``exp_avg_sq``; Adagrad: ``sum`` and an unused empty one; SGD: two empty
  ones) and a float64 ``steps`` array with each parameter's step count;
* rows are processed in order, one optimizer step per group of ``batch`` rows
  (1: strict per-record learning) on the mean loss of the group; each row's
  loss and prediction are those of the model before its group's step.

The arithmetic follows torch.optim's single-tensor CPU implementation element
by element (the same float32 roundings of the same expressions), so a model
trained here agrees with one trained through autograd to float32 rounding.

Why it is written the way it is:

* one compiled variant per optimizer and model shape (:func:`make_train_loop`),
  made on first use: a process compiles only the one it trains with (1-2.5 s
  cold, a fraction of a second from numba's on-disk cache); the loss is a
  run-time code, branched on once per record outside the inner loops;
* helpers take and return scalars only: passing arrays to a compiled helper
  costs a pair of atomic reference-count updates per array per call, which
  at one call per record was 10x the arithmetic of a linear model;
* scratch memory comes from the caller: allocating here would compile numpy's
  allocators too, a large part of a cold start;
* ``fastmath`` allows only reassociation and contraction, so the dot products
  vectorize (a sequential float32 reduction is latency-bound) while NaN and
  Inf keep their meaning: a diverging model reports NaN losses as torch does;
* ``error_model="numpy"``: a float division by zero gives Inf as in torch,
  and no per-division check keeps the element-wise loops from vectorizing;
* micro-batches of a hidden layer (groups of ``BLAS_MIN_ROWS`` rows or more)
  have a variant of their own (``grouped``, :func:`_hidden_layer_group`): every
  row of a group sees the same parameters, so the hidden layer's forward pass
  and weight gradient are two matrix products (SciPy's BLAS through numba's
  ``np.dot``) instead of h dot products of length d per row, each ending in a
  horizontal sum. ``OnlineLearner.learn_many`` in memory (d=16, 64 hidden
  units, groups of 32, SGD), the commit before against this, alternating:
  0.35-0.39 us a record row by row, 0.13-0.14 us this way. Strict learning
  (groups of one) stays row by row, and never waits for the grouped
  variant's longer compile.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Final

# numba's cache goes to a user cache directory, never next to this file (read-only in the image):
# numba reads NUMBA_CACHE_DIR at import. kernels.cache_dir() sets the same default before importing
# this module; this covers an import of this module alone (a test, a benchmark).
if not os.environ.get("NUMBA_CACHE_DIR"):
    _CACHE_HOME = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    os.environ["NUMBA_CACHE_DIR"] = str(Path(_CACHE_HOME) / "streamtrainer" / "numba")
    if "numba.core.config" in sys.modules:  # imported already: it reads the variable again
        sys.modules["numba.core.config"].reload_config()

import numpy as np
from numba import njit

MSE: Final = 0
L1: Final = 1
BCE: Final = 2
CE: Final = 3

SGD: Final = 0
ADAM: Final = 1
ADAGRAD: Final = 2

_FASTMATH: Final = {"reassoc", "contract"}


# Groups of at least this many rows take a hidden layer through matrix products (see
# _hidden_layer_group); below it a BLAS call costs more than it saves.
BLAS_MIN_ROWS: Final = 4


def work_size(n_features: int, hidden: int, n_outputs: int, group_rows: int = 0) -> int:
    """float32 scratch :func:`train_loop` needs (``hidden`` 0 for a linear model).

    ``group_rows``: the batch size, for a grouped variant (its group buffers).
    """
    width = hidden if hidden else n_features
    per_row = hidden * n_features + 3 * hidden + n_outputs * width + 3 * n_outputs
    return per_row + 2 * group_rows * (hidden + n_outputs)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _scalar_loss(score: float, target: float, loss: int, scale: float) -> tuple[float, float, float]:
    """(loss, scale * d loss / d score, prediction) of a single-output model."""
    diff = score - target
    if loss == MSE:
        return diff * diff, 2.0 * diff * scale, score
    if loss == L1:
        sign = 1.0 if diff > 0 else (-1.0 if diff < 0 else 0.0)  # torch.sign: 0 at 0
        return (diff if diff >= 0 else -diff), sign * scale, score
    # BCE with logits in its overflow-free form: max(s, 0) - s*y + log(1 + exp(-|s|))
    magnitude = score if score >= 0 else -score
    positive = score if score > 0 else 0.0
    value = positive - score * target + math.log1p(math.exp(-magnitude))
    if score >= 0:
        sigmoid = 1.0 / (1.0 + math.exp(-score))
    else:
        z = math.exp(score)
        sigmoid = z / (1.0 + z)
    return value, (sigmoid - target) * scale, (1.0 if score > 0 else 0.0)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _advance(step: float, round_step: bool) -> float:
    step += 1.0
    if round_step:
        # torch keeps the step count in a float32 tensor: mirror its rounding past 2**24.
        step = float(np.float32(step))
    return step


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _adam_constants(
    step: float, lr: float, beta1: float, beta2: float, eps: float
) -> tuple[np.float32, np.float32, np.float32, np.float32, np.float32, np.float32]:
    # Bias corrections in double precision, as torch computes them in Python; the
    # tensor ops then see them as float32 scalars.
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return (
        np.float32(-(lr / bias_correction1)),
        np.float32(1.0 - beta1),
        np.float32(beta2),
        np.float32(1.0 - beta2),
        np.float32(math.sqrt(bias_correction2)),
        np.float32(eps),
    )


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _adam(  # noqa: PLR0917 - scalars in and out: array arguments would cost refcounts per call
    p: np.float32,
    g: np.float32,
    m: np.float32,
    v: np.float32,
    neg_step_size: np.float32,
    w1: np.float32,
    b2: np.float32,
    w2: np.float32,
    bias_correction2_sqrt: np.float32,
    eps: np.float32,
) -> tuple[np.float32, np.float32, np.float32]:
    m = m + w1 * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * b2  # exp_avg_sq.mul_(beta2)
    v = v + w2 * g * g  # .addcmul_(grad, grad, value=1 - beta2)
    denom = np.sqrt(v) / bias_correction2_sqrt + eps  # (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    return p + neg_step_size * (m / denom), m, v  # param.addcdiv_(exp_avg, denom, value=-step_size)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _adagrad(
    p: np.float32, g: np.float32, s: np.float32, neg_clr: np.float32, eps: np.float32
) -> tuple[np.float32, np.float32]:
    s = s + g * g  # state_sum.addcmul_(grad, grad, value=1)
    return p + neg_clr * (g / (np.sqrt(s) + eps)), s  # param.addcdiv_(grad, std, value=-clr)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _loss_and_slope(  # noqa: PLR0917
    out: np.ndarray,
    dout: np.ndarray,
    target: float,
    loss: int,
    scale: float,
    losses: np.ndarray,
    predictions: np.ndarray,
    r: int,
) -> None:
    """Record ``r``'s loss and prediction, and scale * d loss / d out into ``dout``."""
    if loss == CE:
        k = out.shape[0]
        best = 0
        for o in range(1, k):
            if out[o] > out[best]:  # strict: the first maximum wins, as torch.argmax
                best = o
        top = float(out[best])
        total = 0.0
        for o in range(k):
            total += math.exp(float(out[o]) - top)
        label = int(target)
        losses[r] = top + math.log(total) - float(out[label])
        predictions[r] = best
        for o in range(k):
            p = math.exp(float(out[o]) - top) / total
            if o == label:
                p -= 1.0
            dout[o] = np.float32(p * scale)
        return
    value, slope, prediction = _scalar_loss(float(out[0]), target, loss, scale)
    losses[r] = value
    predictions[r] = prediction
    dout[0] = np.float32(slope)


@njit(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")
def _hidden_layer_group(  # noqa: PLR0917 - a compiled helper: arrays and scalars positionally
    xg: np.ndarray,
    yg: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    loss: int,
    losses: np.ndarray,
    predictions: np.ndarray,
    first_row: int,
    group: np.ndarray,
    grad_w1: np.ndarray,
    grad_b1: np.ndarray,
    grad_w2: np.ndarray,
    grad_b2: np.ndarray,
) -> None:
    """One group's gradients of ``Linear(d, h) -> ReLU -> Linear(h, k)`` by matrix products.

    Every row of a group sees the same parameters, so the forward and backward
    passes of its m rows are matrix products (BLAS sgemm: m x d x h multiply-adds
    each, register-blocked), where row by row they were h dot products of
    length d each ending in a horizontal sum. Fills the gradients of the group's
    mean loss and its rows' losses and predictions; ``group`` is the float32
    scratch of :func:`work_size`'s group buffers. It takes arrays, unlike the
    per-record helpers: it is called once per group, not once per record.
    """
    m, d = xg.shape
    h, k = b1.shape[0], b2.shape[0]
    scale = 1.0 / m
    hidden = group[: m * h].reshape((m, h))
    grad_hidden = group[m * h : 2 * m * h].reshape((m, h))
    # -- forward: the hidden layer by one matrix product, the (narrow) output layer by loops --
    np.dot(xg, w1.reshape((h, d)).T, hidden)
    if k == 1:
        # One output (every loss but cross-entropy): each row's whole remaining pass in two
        # sweeps over its hidden units, the loss in scalars between them.
        grad_b2[0] = 0.0
        for j in range(h):
            grad_w2[j] = 0.0
            grad_b1[j] = 0.0
        for r in range(m):
            acc = np.float32(0.0)
            for j in range(h):
                a = hidden[r, j] + b1[j]
                a = a if (a > 0 or math.isnan(a)) else np.float32(0.0)  # relu; NaN passes
                hidden[r, j] = a
                acc += w2[j] * a
            value, slope, prediction = _scalar_loss(float(acc + b2[0]), float(yg[r]), loss, scale)
            losses[first_row + r], predictions[first_row + r] = value, prediction
            g = np.float32(slope)
            grad_b2[0] += g
            for j in range(h):
                a = hidden[r, j]
                grad_w2[j] += g * a
                # relu backward (threshold_backward), with the output weights of the forward pass
                gh = np.float32(0.0) if a <= 0 else g * w2[j]
                grad_hidden[r, j] = gh
                grad_b1[j] += gh
        np.dot(grad_hidden.T, xg, grad_w1.reshape((h, d)))
        return
    # Several outputs (cross-entropy): the output layer and the loss row by row.
    out = group[2 * m * h : 2 * m * h + m * k].reshape((m, k))
    dout = group[2 * m * h + m * k : 2 * m * h + 2 * m * k].reshape((m, k))
    for r in range(m):
        for j in range(h):
            a = hidden[r, j] + b1[j]
            hidden[r, j] = a if (a > 0 or math.isnan(a)) else np.float32(0.0)  # relu; NaN passes
        for o in range(k):
            base = o * h
            acc = np.float32(0.0)
            for j in range(h):
                acc += w2[base + j] * hidden[r, j]
            out[r, o] = acc + b2[o]
        # -- loss, prediction and d(mean loss)/d(out) ----------------------------------
        _loss_and_slope(out[r], dout[r], float(yg[r]), loss, scale, losses, predictions, first_row + r)
    # -- backward: the output layer by loops, the hidden layer by one matrix product ------
    for j in range(k * h):
        grad_w2[j] = 0.0
    for o in range(k):
        grad_b2[o] = 0.0
    for r in range(m):
        for o in range(k):
            g = dout[r, o]
            base = o * h
            grad_b2[o] += g
            for j in range(h):
                grad_w2[base + j] += g * hidden[r, j]
        for j in range(h):
            grad_hidden[r, j] = 0.0
        for o in range(k):  # with the output layer's weights of the forward pass
            g = dout[r, o]
            base = o * h
            for j in range(h):
                grad_hidden[r, j] += g * w2[base + j]
        for j in range(h):
            if hidden[r, j] <= 0:  # relu backward: threshold_backward(grad, result, 0)
                grad_hidden[r, j] = 0.0
    np.dot(grad_hidden.T, xg, grad_w1.reshape((h, d)))
    for j in range(h):
        grad_b1[j] = grad_hidden[0, j]
    for r in range(1, m):
        for j in range(h):
            grad_b1[j] += grad_hidden[r, j]


def make_train_loop(opt: int, hidden_layer: bool, grouped: bool = False) -> Any:
    """The loop specialised for one optimizer, with or without a hidden layer.

    ``opt``, ``hidden_layer`` and ``grouped`` are closure constants: numba drops
    the branches they rule out before it compiles, so each variant compiles only
    its own code (1-2.5 s cold instead of ~4 s for one loop that does
    everything) and is cached on disk under its own key. ``grouped`` (a hidden
    layer only) adds the matrix-product pass for groups of ``BLAS_MIN_ROWS`` rows
    or more, ~2 s more to compile: a separate variant, so that strict learning
    never waits for it. The loss stays a run-time code: its branch is taken once
    per record, outside the inner loops.
    """

    @njit(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")
    def train_loop(  # noqa: PLR0917 - a compiled entry point takes arrays and scalars positionally
        x: np.ndarray,
        y: np.ndarray,
        w1: np.ndarray,
        b1: np.ndarray,
        w2: np.ndarray,
        b2: np.ndarray,
        w1_s1: np.ndarray,
        w1_s2: np.ndarray,
        b1_s1: np.ndarray,
        b1_s2: np.ndarray,
        w2_s1: np.ndarray,
        w2_s2: np.ndarray,
        b2_s1: np.ndarray,
        b2_s2: np.ndarray,
        steps: np.ndarray,
        loss: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        lr_decay: float,
        round_step: bool,
        batch: int,
        losses: np.ndarray,
        predictions: np.ndarray,
        work: np.ndarray,
    ) -> None:
        """``Linear(d, h) -> ReLU -> Linear(h, k)``, or ``Linear(d, k)`` (``w1``, ``b1`` empty).

        ``steps`` holds the step counts of w1, b1, w2, b2 (the first two unused
        without a hidden layer); ``work`` is float32 scratch of :func:`work_size`.
        """
        n, d = x.shape
        h = b1.shape[0] if hidden_layer else 0
        k = b2.shape[0]
        width = h if h else d  # inputs of the output layer
        grad_w1 = work[0 : h * d]
        at = h * d
        grad_b1 = work[at : at + h]
        hidden = work[at + h : at + 2 * h]
        grad_hidden = work[at + 2 * h : at + 3 * h]
        at += 3 * h
        grad_w2 = work[at : at + k * width]
        at += k * width
        grad_b2 = work[at : at + k]
        out = work[at + k : at + 2 * k]
        dout = work[at + 2 * k : at + 3 * k]
        at += 3 * k
        group = work[at : at + 2 * (batch if grouped else 0) * (h + k)]
        first_param = 0 if hidden_layer else 2  # without a hidden layer only w2, b2 take steps

        for start in range(0, n, batch):
            stop = start + batch if start + batch < n else n
            scale = 1.0 / (stop - start)
            if grouped and stop - start >= BLAS_MIN_ROWS:
                _hidden_layer_group(
                    x[start:stop], y[start:stop], w1, b1, w2, b2, loss, losses, predictions, start,
                    group, grad_w1, grad_b1, grad_w2, grad_b2,
                )  # fmt: skip
            else:
                for r in range(start, stop):
                    xr = x[r]
                    first = r == start  # the group's first row overwrites the gradient buffers
                    # -- forward ---------------------------------------------------------
                    if hidden_layer:
                        for j in range(h):
                            base = j * d
                            acc = np.float32(0.0)
                            for i in range(d):
                                acc += w1[base + i] * xr[i]
                            a = acc + b1[j]
                            # relu; NaN passes through, as in torch
                            hidden[j] = a if (a > 0 or math.isnan(a)) else np.float32(0.0)
                        inputs = hidden
                    else:
                        inputs = xr
                    for o in range(k):
                        base = o * width
                        acc = np.float32(0.0)
                        for j in range(width):
                            acc += w2[base + j] * inputs[j]
                        out[o] = acc + b2[o]
                    # -- loss, prediction and d(mean loss)/d(out) ------------------------
                    _loss_and_slope(out, dout, float(y[r]), loss, scale, losses, predictions, r)
                    # -- backward ------------------------------------------------------
                    if hidden_layer:
                        # through the output layer with its weights as they were in the forward pass
                        for j in range(h):
                            grad_hidden[j] = 0.0
                        for o in range(k):
                            g = dout[o]
                            base = o * h
                            for j in range(h):
                                grad_hidden[j] += g * w2[base + j]
                        for j in range(h):
                            if hidden[j] <= 0:  # relu backward: threshold_backward(grad, result, 0)
                                grad_hidden[j] = 0.0
                    for o in range(k):
                        g = dout[o]
                        base = o * width
                        if first:
                            for j in range(width):
                                grad_w2[base + j] = g * inputs[j]
                            grad_b2[o] = g
                        else:
                            for j in range(width):
                                grad_w2[base + j] += g * inputs[j]
                            grad_b2[o] += g
                    if hidden_layer:
                        for j in range(h):
                            g = grad_hidden[j]
                            base = j * d
                            if first:
                                for i in range(d):
                                    grad_w1[base + i] = g * xr[i]
                                grad_b1[j] = g
                            else:
                                for i in range(d):
                                    grad_w1[base + i] += g * xr[i]
                                grad_b1[j] += g

            # -- optimizer step, parameter by parameter as torch.optim does ------------
            if opt == SGD:
                alpha = np.float32(-lr)  # param.add_(grad, alpha=-lr)
                if hidden_layer:
                    for i in range(w1.shape[0]):
                        w1[i] = w1[i] + alpha * grad_w1[i]
                    for i in range(h):
                        b1[i] = b1[i] + alpha * grad_b1[i]
                for i in range(w2.shape[0]):
                    w2[i] = w2[i] + alpha * grad_w2[i]
                for i in range(k):
                    b2[i] = b2[i] + alpha * grad_b2[i]
                continue
            for index in range(first_param, 4):
                steps[index] = _advance(steps[index], round_step)
            if opt == ADAM:
                if hidden_layer:
                    c0, c1, c2, c3, c4, c5 = _adam_constants(steps[0], lr, beta1, beta2, eps)
                    for i in range(w1.shape[0]):
                        w1[i], w1_s1[i], w1_s2[i] = _adam(
                            w1[i], grad_w1[i], w1_s1[i], w1_s2[i], c0, c1, c2, c3, c4, c5
                        )
                    c0, c1, c2, c3, c4, c5 = _adam_constants(steps[1], lr, beta1, beta2, eps)
                    for i in range(h):
                        b1[i], b1_s1[i], b1_s2[i] = _adam(
                            b1[i], grad_b1[i], b1_s1[i], b1_s2[i], c0, c1, c2, c3, c4, c5
                        )
                c0, c1, c2, c3, c4, c5 = _adam_constants(steps[2], lr, beta1, beta2, eps)
                for i in range(w2.shape[0]):
                    w2[i], w2_s1[i], w2_s2[i] = _adam(
                        w2[i], grad_w2[i], w2_s1[i], w2_s2[i], c0, c1, c2, c3, c4, c5
                    )
                c0, c1, c2, c3, c4, c5 = _adam_constants(steps[3], lr, beta1, beta2, eps)
                for i in range(k):
                    b2[i], b2_s1[i], b2_s2[i] = _adam(
                        b2[i], grad_b2[i], b2_s1[i], b2_s2[i], c0, c1, c2, c3, c4, c5
                    )
            else:
                e = np.float32(eps)
                if hidden_layer:
                    neg_clr = np.float32(-(lr / (1.0 + (steps[0] - 1.0) * lr_decay)))
                    for i in range(w1.shape[0]):
                        w1[i], w1_s1[i] = _adagrad(w1[i], grad_w1[i], w1_s1[i], neg_clr, e)
                    neg_clr = np.float32(-(lr / (1.0 + (steps[1] - 1.0) * lr_decay)))
                    for i in range(h):
                        b1[i], b1_s1[i] = _adagrad(b1[i], grad_b1[i], b1_s1[i], neg_clr, e)
                neg_clr = np.float32(-(lr / (1.0 + (steps[2] - 1.0) * lr_decay)))
                for i in range(w2.shape[0]):
                    w2[i], w2_s1[i] = _adagrad(w2[i], grad_w2[i], w2_s1[i], neg_clr, e)
                neg_clr = np.float32(-(lr / (1.0 + (steps[3] - 1.0) * lr_decay)))
                for i in range(k):
                    b2[i], b2_s1[i] = _adagrad(b2[i], grad_b2[i], b2_s1[i], neg_clr, e)

    return train_loop


@njit(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")
def standardize_loop(  # noqa: PLR0917 - a compiled entry point takes arrays and scalars positionally
    x: np.ndarray, mean: np.ndarray, m2: np.ndarray, count: float, eps: float, out: np.ndarray
) -> None:
    """RunningStandardizer.learn_transform record by record (Welford), updating ``mean``/``m2``.

    Each row first updates the running mean and sum of squared deviations, then
    is scaled with them: the same statistics the prefix-sum implementation gives
    every row, computed in one pass instead of a dozen whole-batch temporaries.
    """
    n, d = x.shape
    for r in range(n):
        count += 1.0
        # One division a row, not two an element: the loop is bound by divisions and square
        # roots (0.050 -> 0.031 us a record at d=16; the same statistics to 1e-15).
        inv_count = 1.0 / count
        for i in range(d):
            value = float(x[r, i])
            delta = value - mean[i]
            new_mean = mean[i] + delta * inv_count
            new_m2 = m2[i] + delta * (value - new_mean)
            mean[i], m2[i] = new_mean, new_m2
            out[r, i] = np.float32((value - new_mean) / math.sqrt(new_m2 * inv_count + eps))


def compile_variant(opt: int, hidden_layer: bool, grouped: bool = False) -> Any:
    """Make and compile one training-loop variant (or load it from the on-disk cache).

    The call uses tiny arrays of exactly the types ``kernels.fused_learn`` passes
    (C-contiguous writable float32/float64, int64 and float64 scalars), so this
    compiles the one signature that is used. Returns the dispatcher.
    """
    loop = make_train_loop(opt, hidden_layer, grouped)
    d, h, batch = 2, (2 if hidden_layer else 0), (BLAS_MIN_ROWS if grouped else 1)
    sizes = (h * d, h, h or d, 1)  # w1, b1, w2, b2 (w1 and b1 empty without a hidden layer)
    params = [np.zeros(size, np.float32) for size in sizes]
    # Optimizer state of every parameter's size: the Adam and Adagrad steps index it.
    state = [np.zeros(size, np.float32) for size in sizes for _ in range(2)]
    loop(
        np.zeros((batch, d), np.float32), np.zeros(batch, np.float32), *params, *state, np.zeros(4), 0,
        0.0, 0.9, 0.999, 1e-8, 0.0, True, batch, np.empty(batch), np.empty(batch),
        np.empty(work_size(d, h, 1, batch if grouped else 0), np.float32),
    )  # fmt: skip
    return loop


def compile_standardizer() -> None:
    """Compile (or load) :func:`standardize_loop` for the types ``kernels.fused_standardize`` passes."""
    standardize_loop(
        np.zeros((1, 2), np.float32), np.zeros(2), np.zeros(2), 0.0, 1e-8, np.empty((1, 2), np.float32)
    )
