"""Compiled per-record training loop for a lowered program (:mod:`streamtrainer.training.lowering`).

The program-shaped sibling of :mod:`streamtrainer.training.fused_loops`: the
same discipline (a closure constant per optimizer, scratch from the caller,
the loss as a run-time code, torch.optim's single-tensor CPU arithmetic element
by element), but the model is data: a table of operations (``ops``: rows of
``code, n_in, n_out, weight, bias``, parameter indices; ``consts``: a slope,
alpha or eps per op) over a chain of activation blocks. Imports no torch: the
compiler child process imports this module alone.

* parameters are one flat float32 array ``theta`` (``offsets[p]`` is where
  parameter ``p`` starts, torch layout inside), optimizer state two flat arrays
  of the same size (Adam: ``exp_avg``, ``exp_avg_sq``; Adagrad: ``sum`` and an
  empty one; SGD: two empty ones) and a float64 step count per parameter.
  ``kernels`` gathers them from the torch tensors before a call and scatters
  them back after it (``program_call``);
* rows are processed in groups of ``batch`` (1: strict per-record learning),
  one optimizer step per group on its mean loss; each row's loss and prediction
  are those of the model before its group's step. The forward pass keeps every
  op's output for the whole group (``work``), then the backward pass runs op by
  op over the group's rows, so the loop over the ops is paid once per group;
* the ``grouped`` variant takes the Linear layers of groups of
  ``BLAS_MIN_ROWS`` rows or more (at least ``BLAS_MIN_WIDTH`` outputs) through
  BLAS matrix products, as the hand-written loop's grouped variant does; it
  is a separate variant so that strict learning never waits for its compile.

Elementwise functions follow torch's CPU formulas (tanh and sigmoid from their
output in the backward pass, GELU/SiLU/ELU/LeakyReLU from their input,
LayerNorm's backward in torch's ``a*dy*gamma + b*x + c`` form); transcendental
functions are computed in double precision and rounded, which agrees with
torch's vectorized float32 versions to an ulp or two.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
from numba import njit

from streamtrainer.training import fused_loops
from streamtrainer.training.fused_loops import (
    ADAGRAD,
    ADAM,
    BLAS_MIN_ROWS,
    CE,
    SGD,
    _adagrad,
    _adam,
    _adam_constants,
    _advance,
    _loss_and_slope,
    _scalar_loss,
)

# The codes of lowering.py (which imports torch, so it cannot be imported here).
LINEAR: Final = 0
RELU: Final = 1
LEAKY_RELU: Final = 2
TANH: Final = 3
SIGMOID: Final = 4
GELU: Final = 5
GELU_TANH: Final = 6
SILU: Final = 7
ELU: Final = 8
LAYER_NORM: Final = 9

# A Linear layer with fewer outputs (an output layer) stays on loops in the grouped variant: a
# BLAS call costs more than a dot product per row there.
BLAS_MIN_WIDTH: Final = 8

_FASTMATH: Final = {"reassoc", "contract"}
_SQRT1_2: Final = 1.0 / math.sqrt(2.0)
_GELU_PDF: Final = 0.5 * (2.0 / math.sqrt(math.pi)) * _SQRT1_2  # torch's kBeta of gelu_backward
_GELU_TANH_BETA: Final = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5
_GELU_TANH_KAPPA: Final = 0.044715

__all__ = ["BLAS_MIN_ROWS", "BLAS_MIN_WIDTH", "compile_variant", "make_program_loop", "work_size"]


def work_size(n_features: int, widths: list[int], n_theta: int, batch: int) -> int:
    """float32 scratch a program loop needs: ``widths`` are the ops' output widths."""
    total = n_features + sum(widths)
    widest = max([n_features, *widths])
    return n_theta + batch * total + 2 * batch * widest + 2 * batch * len(widths)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _forward_elementwise(code: int, x: np.float32, c: np.float32) -> np.float32:
    if code == RELU:
        return x if (x > 0 or math.isnan(x)) else np.float32(0.0)  # NaN passes, as in torch
    if code == LEAKY_RELU:
        return x if x > 0 else x * c
    if code == TANH:
        return np.float32(math.tanh(float(x)))
    if code == SIGMOID:
        return np.float32(1.0 / (1.0 + math.exp(-float(x))))
    v = float(x)
    if code == GELU:
        return np.float32(0.5 * v * (1.0 + math.erf(v * _SQRT1_2)))
    if code == GELU_TANH:
        inner = _GELU_TANH_BETA * (v + _GELU_TANH_KAPPA * v * v * v)
        return np.float32(0.5 * v * (1.0 + math.tanh(inner)))
    if code == SILU:
        return np.float32(v / (1.0 + math.exp(-v)))
    # ELU
    return x if x > 0 else np.float32(float(c) * (math.exp(v) - 1.0))


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _backward_elementwise(
    code: int, g: np.float32, x: np.float32, y: np.float32, c: np.float32
) -> np.float32:
    """d/dx of one element: ``g`` the gradient of the output ``y``, ``x`` the input."""
    if code == RELU:
        return np.float32(0.0) if y <= 0 else g  # threshold_backward(grad, result, 0)
    if code == LEAKY_RELU:
        return g if x > 0 else g * c
    if code == TANH:
        return g * (np.float32(1.0) - y * y)  # tanh_backward, from the output
    if code == SIGMOID:
        return g * (np.float32(1.0) - y) * y  # sigmoid_backward, from the output
    v = float(x)
    if code == GELU:
        cdf = 0.5 * (1.0 + math.erf(v * _SQRT1_2))
        pdf = math.exp(-0.5 * v * v) * _GELU_PDF
        return np.float32(float(g) * (cdf + v * pdf))
    if code == GELU_TANH:
        x_sq = v * v
        inner = _GELU_TANH_BETA * (v + _GELU_TANH_KAPPA * x_sq * v)
        t = math.tanh(inner)
        left_derivative = 0.5 * (1.0 + t)
        right_derivative = 1.0 - t * t
        inner_derivative = _GELU_TANH_BETA * (1.0 + 3.0 * _GELU_TANH_KAPPA * x_sq)
        return np.float32(float(g) * (left_derivative + 0.5 * v * right_derivative * inner_derivative))
    if code == SILU:
        s = 1.0 / (1.0 + math.exp(-v))
        return np.float32(float(g) * s * (1.0 + v * (1.0 - s)))
    # ELU, from its input
    return g if x > 0 else np.float32(float(g) * float(c) * math.exp(v))


def make_program_loop(opt: int, grouped: bool = False) -> Any:
    """The program loop specialised for one optimizer (and with or without BLAS for groups).

    ``opt`` and ``grouped`` are closure constants, as in
    :func:`fused_loops.make_train_loop`: each variant compiles only its own code
    and is cached on disk under its own key. The program itself is run-time
    data: one compiled variant runs every program.
    """

    @njit(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")
    def program_loop(  # noqa: PLR0917 - a compiled entry point
        x: np.ndarray,
        y: np.ndarray,
        ops: np.ndarray,
        consts: np.ndarray,
        theta: np.ndarray,
        offsets: np.ndarray,
        s1: np.ndarray,
        s2: np.ndarray,
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
        n, d = x.shape
        n_ops = ops.shape[0]
        n_theta = theta.shape[0]
        n_params = offsets.shape[0] - 1
        k = ops[n_ops - 1, 2]
        total = d
        widest = d
        for t in range(n_ops):
            total += ops[t, 2]
            widest = max(widest, ops[t, 2])
        grad = work[0:n_theta]
        at = n_theta
        acts = work[at : at + batch * total]
        at += batch * total
        buffer_a = work[at : at + batch * widest]
        at += batch * widest
        buffer_b = work[at : at + batch * widest]
        at += batch * widest
        aux = work[at : at + 2 * batch * n_ops]
        # The backward pass stops at the first op with parameters: no gradient of the input.
        first_param_op = n_ops
        for t in range(n_ops):
            if ops[t, 3] >= 0 or ops[t, 4] >= 0:
                first_param_op = t
                break

        for start in range(0, n, batch):
            stop = start + batch if start + batch < n else n
            m = stop - start
            scale = 1.0 / m
            for r in range(m):
                for i in range(d):
                    acts[r * d + i] = x[start + r, i]
            # -- forward: block t (the input of op t) starts at m * col ----------------
            col = 0
            for t in range(n_ops):
                code, n_in, n_out, wi, bi = ops[t, 0], ops[t, 1], ops[t, 2], ops[t, 3], ops[t, 4]
                src = m * col
                dst = m * (col + n_in)
                if code == LINEAR:
                    w = offsets[wi]
                    if grouped and m >= BLAS_MIN_ROWS and n_out >= BLAS_MIN_WIDTH:
                        np.dot(
                            acts[src : src + m * n_in].reshape((m, n_in)),
                            theta[w : w + n_out * n_in].reshape((n_out, n_in)).T,
                            acts[dst : dst + m * n_out].reshape((m, n_out)),
                        )
                        if bi >= 0:
                            b = offsets[bi]
                            for r in range(m):
                                row = dst + r * n_out
                                for j in range(n_out):
                                    acts[row + j] += theta[b + j]
                    else:
                        for r in range(m):
                            xr = src + r * n_in
                            row = dst + r * n_out
                            for j in range(n_out):
                                base = w + j * n_in
                                acc = np.float32(0.0)
                                for i in range(n_in):
                                    acc += theta[base + i] * acts[xr + i]
                                acts[row + j] = acc + theta[offsets[bi] + j] if bi >= 0 else acc
                elif code == LAYER_NORM:
                    ln_eps = consts[t]
                    for r in range(m):
                        xr = src + r * n_in
                        row = dst + r * n_out
                        total_x = 0.0
                        for i in range(n_in):
                            total_x += acts[xr + i]
                        mean = total_x / n_in
                        total_sq = 0.0
                        for i in range(n_in):
                            diff = acts[xr + i] - mean
                            total_sq += diff * diff
                        rstd = np.float32(1.0 / math.sqrt(total_sq / n_in + ln_eps))
                        shift = -rstd * np.float32(mean)
                        aux[2 * (t * batch + r)] = np.float32(mean)
                        aux[2 * (t * batch + r) + 1] = rstd
                        for i in range(n_in):
                            normed = acts[xr + i] * rstd + shift
                            if wi >= 0:
                                normed = normed * theta[offsets[wi] + i]
                            if bi >= 0:
                                normed = normed + theta[offsets[bi] + i]
                            acts[row + i] = normed
                else:
                    c = np.float32(consts[t])
                    for i in range(m * n_in):
                        acts[dst + i] = _forward_elementwise(code, acts[src + i], c)
                col += n_in

            # -- loss, prediction and d(mean loss)/d(out) into buffer_a ---------------
            out = m * col
            if loss == CE:
                for r in range(m):
                    _loss_and_slope(
                        acts[out + r * k : out + (r + 1) * k],
                        buffer_a[r * k : (r + 1) * k],
                        float(y[start + r]), loss, scale, losses, predictions, start + r,
                    )  # fmt: skip
            else:
                for r in range(m):
                    value, slope, prediction = _scalar_loss(
                        float(acts[out + r]), float(y[start + r]), loss, scale
                    )
                    losses[start + r] = value
                    predictions[start + r] = prediction
                    buffer_a[r] = np.float32(slope)

            # -- backward: g holds d/d(output of op t), (m, n_out) --------------------
            g, g_in = buffer_a, buffer_b
            for t in range(n_ops - 1, first_param_op - 1, -1):
                code, n_in, n_out, wi, bi = ops[t, 0], ops[t, 1], ops[t, 2], ops[t, 3], ops[t, 4]
                col -= n_in
                src = m * col
                dst = m * (col + n_in)
                need_input = t > first_param_op
                if code == LINEAR:
                    w = offsets[wi]
                    gw = offsets[wi]
                    if grouped and m >= BLAS_MIN_ROWS and n_out >= BLAS_MIN_WIDTH:
                        g2 = g[0 : m * n_out].reshape((m, n_out))
                        np.dot(
                            g2.T,
                            acts[src : src + m * n_in].reshape((m, n_in)),
                            grad[gw : gw + n_out * n_in].reshape((n_out, n_in)),
                        )
                        if need_input:
                            np.dot(
                                g2,
                                theta[w : w + n_out * n_in].reshape((n_out, n_in)),
                                g_in[0 : m * n_in].reshape((m, n_in)),
                            )
                    else:
                        for r in range(m):
                            xr = src + r * n_in
                            for j in range(n_out):
                                gj = g[r * n_out + j]
                                base = gw + j * n_in
                                if r == 0:
                                    for i in range(n_in):
                                        grad[base + i] = gj * acts[xr + i]
                                else:
                                    for i in range(n_in):
                                        grad[base + i] += gj * acts[xr + i]
                            if need_input:
                                gr = r * n_in
                                for i in range(n_in):
                                    g_in[gr + i] = 0.0
                                for j in range(n_out):
                                    gj = g[r * n_out + j]
                                    base = w + j * n_in
                                    for i in range(n_in):
                                        g_in[gr + i] += gj * theta[base + i]
                    if bi >= 0:
                        gb = offsets[bi]
                        for j in range(n_out):
                            grad[gb + j] = g[j]
                        for r in range(1, m):
                            for j in range(n_out):
                                grad[gb + j] += g[r * n_out + j]
                elif code == LAYER_NORM:
                    for i in range(n_in):
                        if wi >= 0:
                            grad[offsets[wi] + i] = 0.0
                        if bi >= 0:
                            grad[offsets[bi] + i] = 0.0
                    inv_n = np.float32(1.0 / n_in)
                    for r in range(m):
                        xr = src + r * n_in
                        gr = r * n_in
                        mean = aux[2 * (t * batch + r)]
                        rstd = aux[2 * (t * batch + r) + 1]
                        ds = np.float32(0.0)
                        db = np.float32(0.0)
                        for i in range(n_in):
                            gamma = theta[offsets[wi] + i] if wi >= 0 else np.float32(1.0)
                            dy = g[gr + i]
                            if wi >= 0:
                                grad[offsets[wi] + i] += dy * (acts[xr + i] - mean) * rstd
                            if bi >= 0:
                                grad[offsets[bi] + i] += dy
                            ds += dy * gamma * acts[xr + i]
                            db += dy * gamma
                        if need_input:
                            # LayerNormBackwardKernelImplInternal: dx = a*dy*gamma + b*x + c
                            b_coef = (db * mean - ds) * rstd * rstd * rstd * inv_n
                            c_coef = -b_coef * mean - db * rstd * inv_n
                            for i in range(n_in):
                                gamma = theta[offsets[wi] + i] if wi >= 0 else np.float32(1.0)
                                g_in[gr + i] = rstd * g[gr + i] * gamma + b_coef * acts[xr + i] + c_coef
                elif need_input:
                    c = np.float32(consts[t])
                    for i in range(m * n_in):
                        g_in[i] = _backward_elementwise(code, g[i], acts[src + i], acts[dst + i], c)
                g, g_in = g_in, g

            # -- optimizer step, parameter by parameter as torch.optim does ------------
            if opt == SGD:
                alpha = np.float32(-lr)  # param.add_(grad, alpha=-lr)
                for i in range(n_theta):
                    theta[i] = theta[i] + alpha * grad[i]
                continue
            for p in range(n_params):
                steps[p] = _advance(steps[p], round_step)
                low, high = offsets[p], offsets[p + 1]
                if opt == ADAM:
                    c0, c1, c2, c3, c4, c5 = _adam_constants(steps[p], lr, beta1, beta2, eps)
                    for i in range(low, high):
                        theta[i], s1[i], s2[i] = _adam(
                            theta[i], grad[i], s1[i], s2[i], c0, c1, c2, c3, c4, c5
                        )
                elif opt == ADAGRAD:
                    neg_clr = np.float32(-(lr / (1.0 + (steps[p] - 1.0) * lr_decay)))
                    e = np.float32(eps)
                    for i in range(low, high):
                        theta[i], s1[i] = _adagrad(theta[i], grad[i], s1[i], neg_clr, e)

    return program_loop


def compile_variant(opt: int, grouped: bool = False) -> Any:
    """Make and compile one program-loop variant (or load it from the on-disk cache).

    The call passes tiny arrays of exactly the types ``kernels`` passes, so this
    compiles the one signature that is used. Returns the dispatcher.
    """
    loop = make_program_loop(opt, grouped)
    d, batch = 2, (BLAS_MIN_ROWS if grouped else 1)
    ops = np.array([[LINEAR, d, 1, 0, 1]], dtype=np.int64)
    n_theta = d + 1
    loop(
        np.zeros((batch, d), np.float32), np.zeros(batch, np.float32), ops, np.zeros(1),
        np.zeros(n_theta, np.float32), np.array([0, d, n_theta], dtype=np.int64),
        np.zeros(n_theta, np.float32), np.zeros(n_theta, np.float32), np.zeros(2), 0,
        0.0, 0.9, 0.999, 1e-8, 0.0, True, batch, np.empty(batch), np.empty(batch),
        np.empty(work_size(d, [1], n_theta, batch), np.float32),
    )  # fmt: skip
    return loop


assert fused_loops.MSE == 0  # the loss codes are fused_loops' (kernels.LOSS_CODES)
