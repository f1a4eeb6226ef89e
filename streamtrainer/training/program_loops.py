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
from streamtrainer.training.program_ops import (
    GELU,
    GELU_TANH,
    LAYER_NORM,
    LEAKY_RELU,
    LINEAR,
    RELU,
    SIGMOID,
    SILU,
    TANH,
)

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
    """float32 scratch a program loop needs: ``widths`` are the ops' output widths, ``batch`` the rows
    of a group (at most the number of rows of the call)."""
    total = n_features + sum(widths)
    widest = max([n_features, *widths])
    return n_theta + batch * total + 2 * batch * widest + 2 * batch * len(widths)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _tanh32(v: np.float32) -> np.float32:
    """float32 tanh by Eigen's rational approximation (``generic_fast_tanh_float``): 3.4e-7 from the
    exact value at worst (torch's Sleef tanhf: 3e-8). Arithmetic only, so a loop of it vectorizes:
    0.3 ns an element against 11 ns for a call to tanhf (measured in numba, 64-element rows)."""
    limit = np.float32(7.90531110763549805)
    c = min(max(v, -limit), limit)
    x2 = c * c
    p = np.float32(-2.76076847742355e-16) * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = (p * x2 + np.float32(4.89352455891786e-03)) * c
    q = np.float32(1.19825839466702e-06) * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    if math.isnan(v) or abs(v) < np.float32(0.0004):
        return v  # tanh(x) == x to float32 precision near 0; NaN passes, as in torch
    return p / q


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _erf32(v: np.float32) -> np.float32:
    """float32 erf by Eigen's rational approximation (``generic_fast_erf_float``): 4.2e-7 from the
    exact value at worst (torch's: 3e-8); vectorizes, where a call to erff costs 6.5 ns."""
    c = min(max(v, np.float32(-4.0)), np.float32(4.0))
    x2 = c * c
    p = np.float32(-2.72614225801306e-10) * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = (p * x2 + np.float32(-1.60960333262415e-02)) * c
    q = np.float32(-1.45660718464996e-05) * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return p / q


# Elementwise blocks: one loop per function, so that the cheap ones (ReLU, LeakyReLU and every
# backward from the output) vectorize; inlined into the loop in numba's IR (no call, no reference
# counts per call: they run once per op per group, i.e. per record when strict). Transcendentals
# are float32, as torch computes them for float32 tensors; tanh and erf by rational approximations
# that vectorize, exp by a call to expf per element (~2.3 ns: numba has no vector exp).
@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _forward_block(code: int, xs: np.ndarray, ys: np.ndarray, c: np.float32) -> None:
    one, half = np.float32(1.0), np.float32(0.5)
    if code == RELU:
        for i in range(xs.shape[0]):
            v = xs[i]
            ys[i] = v if (v > 0 or math.isnan(v)) else np.float32(0.0)  # NaN passes, as in torch
    elif code == LEAKY_RELU:
        for i in range(xs.shape[0]):
            v = xs[i]
            ys[i] = v if v > 0 else v * c
    elif code == TANH:
        for i in range(xs.shape[0]):
            ys[i] = _tanh32(xs[i])
    elif code == SIGMOID:
        for i in range(xs.shape[0]):
            ys[i] = one / (one + math.exp(-xs[i]))
    elif code == GELU:
        sqrt1_2 = np.float32(_SQRT1_2)
        for i in range(xs.shape[0]):
            v = xs[i]
            ys[i] = v * half * (one + _erf32(v * sqrt1_2))
    elif code == GELU_TANH:
        beta, kappa = np.float32(_GELU_TANH_BETA), np.float32(_GELU_TANH_KAPPA)
        for i in range(xs.shape[0]):
            v = xs[i]
            ys[i] = half * v * (one + _tanh32(beta * (v + kappa * v * v * v)))
    elif code == SILU:
        for i in range(xs.shape[0]):
            v = xs[i]
            ys[i] = v / (one + math.exp(-v))
    else:  # ELU
        for i in range(xs.shape[0]):
            v = xs[i]
            ys[i] = v if v > 0 else c * (math.exp(v) - one)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _backward_block(  # noqa: PLR0917 - inlined
    code: int, gs: np.ndarray, xs: np.ndarray, ys: np.ndarray, gis: np.ndarray, c: np.float32
) -> None:
    """``gis`` = d/d(input) from ``gs`` = d/d(output), the input ``xs`` and the output ``ys``."""
    one, half = np.float32(1.0), np.float32(0.5)
    if code == RELU:
        for i in range(gs.shape[0]):
            gis[i] = np.float32(0.0) if ys[i] <= 0 else gs[i]  # threshold_backward(grad, result, 0)
    elif code == LEAKY_RELU:
        for i in range(gs.shape[0]):
            gis[i] = gs[i] if xs[i] > 0 else gs[i] * c
    elif code == TANH:
        for i in range(gs.shape[0]):
            gis[i] = gs[i] * (one - ys[i] * ys[i])  # tanh_backward, from the output
    elif code == SIGMOID:
        for i in range(gs.shape[0]):
            gis[i] = gs[i] * (one - ys[i]) * ys[i]  # sigmoid_backward, from the output
    elif code == GELU:
        sqrt1_2, k_beta = np.float32(_SQRT1_2), np.float32(_GELU_PDF)
        for i in range(gs.shape[0]):
            v = xs[i]
            cdf = half * (one + _erf32(v * sqrt1_2))
            pdf = math.exp(-half * v * v) * k_beta
            gis[i] = gs[i] * (cdf + v * pdf)
    elif code == GELU_TANH:
        beta, kappa = np.float32(_GELU_TANH_BETA), np.float32(_GELU_TANH_KAPPA)
        three = np.float32(3.0)
        for i in range(gs.shape[0]):
            v = xs[i]
            x_sq = v * v
            t = _tanh32(beta * (v + kappa * x_sq * v))
            left_derivative = half * (one + t)
            right_derivative = one - t * t
            inner_derivative = beta * (one + three * kappa * x_sq)
            gis[i] = gs[i] * (left_derivative + half * v * right_derivative * inner_derivative)
    elif code == SILU:
        for i in range(gs.shape[0]):
            v = xs[i]
            s = one / (one + math.exp(-v))
            gis[i] = gs[i] * s * (one + v * (one - s))
    else:  # ELU, from its input
        for i in range(gs.shape[0]):
            v = xs[i]
            gis[i] = gs[i] if v > 0 else gs[i] * c * math.exp(v)


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
        # The scratch holds one group: ``batch`` rows, or all of them when there are fewer
        # (work_size is called with the same number).
        rows = batch if batch < n else n
        grad = work[0:n_theta]
        at = n_theta
        acts = work[at : at + rows * total]
        at += rows * total
        buffer_a = work[at : at + rows * widest]
        at += rows * widest
        buffer_b = work[at : at + rows * widest]
        at += rows * widest
        aux = work[at : at + 2 * rows * n_ops]
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
            # Every op works on views (xs, ys, ws...) indexed from 0: an index with a run-time offset
            # (theta[w + i]) keeps numba's negative-index check in the inner loop, which stopped
            # LLVM from vectorizing it (16-64-1 ReLU MLP strict: 3.2 us a record with offsets,
            # 0.5-0.7 us with views).
            col = 0
            for t in range(n_ops):
                code, n_in, n_out, wi, bi = ops[t, 0], ops[t, 1], ops[t, 2], ops[t, 3], ops[t, 4]
                xs = acts[m * col : m * (col + n_in)]
                ys = acts[m * (col + n_in) : m * (col + n_in) + m * n_out]
                if code == LINEAR:
                    ws = theta[offsets[wi] : offsets[wi] + n_out * n_in]
                    bs = theta[offsets[bi] : offsets[bi + 1]] if bi >= 0 else theta[0:0]
                    if grouped and m >= BLAS_MIN_ROWS and n_out >= BLAS_MIN_WIDTH:
                        np.dot(xs.reshape((m, n_in)), ws.reshape((n_out, n_in)).T, ys.reshape((m, n_out)))
                        if bi >= 0:
                            for r in range(m):
                                for j in range(n_out):
                                    ys[r * n_out + j] += bs[j]
                    else:
                        for r in range(m):
                            for j in range(n_out):
                                acc = np.float32(0.0)
                                for i in range(n_in):
                                    acc += ws[j * n_in + i] * xs[r * n_in + i]
                                ys[r * n_out + j] = acc + bs[j] if bi >= 0 else acc
                elif code == LAYER_NORM:
                    ln_eps = consts[t]
                    ws = theta[offsets[wi] : offsets[wi + 1]] if wi >= 0 else theta[0:0]
                    bs = theta[offsets[bi] : offsets[bi + 1]] if bi >= 0 else theta[0:0]
                    for r in range(m):
                        xr = xs[r * n_in : (r + 1) * n_in]
                        yr = ys[r * n_in : (r + 1) * n_in]
                        total_x = 0.0
                        for i in range(n_in):
                            total_x += xr[i]
                        mean = total_x / n_in
                        total_sq = 0.0
                        for i in range(n_in):
                            diff = xr[i] - mean
                            total_sq += diff * diff
                        rstd = np.float32(1.0 / math.sqrt(total_sq / n_in + ln_eps))
                        shift = -rstd * np.float32(mean)
                        aux[2 * (t * rows + r)] = np.float32(mean)
                        aux[2 * (t * rows + r) + 1] = rstd
                        # torch: (x * rstd + (-rstd * mean)) * gamma + beta
                        if wi >= 0 and bi >= 0:
                            for i in range(n_in):
                                yr[i] = (xr[i] * rstd + shift) * ws[i] + bs[i]
                        elif wi >= 0:
                            for i in range(n_in):
                                yr[i] = (xr[i] * rstd + shift) * ws[i]
                        else:
                            for i in range(n_in):
                                yr[i] = xr[i] * rstd + shift
                else:
                    _forward_block(code, xs, ys, np.float32(consts[t]))
                col += n_in

            # -- loss, prediction and d(mean loss)/d(out) into buffer_a ---------------
            out = acts[m * col : m * col + m * k]
            if loss == CE:
                for r in range(m):
                    _loss_and_slope(
                        out[r * k : (r + 1) * k], buffer_a[r * k : (r + 1) * k],
                        float(y[start + r]), loss, scale, losses, predictions, start + r,
                    )  # fmt: skip
            else:
                for r in range(m):
                    value, slope, prediction = _scalar_loss(float(out[r]), float(y[start + r]), loss, scale)
                    losses[start + r] = value
                    predictions[start + r] = prediction
                    buffer_a[r] = np.float32(slope)

            # -- backward: g holds d/d(output of op t), (m, n_out) --------------------
            g_out, g_in = buffer_a, buffer_b
            for t in range(n_ops - 1, first_param_op - 1, -1):
                code, n_in, n_out, wi, bi = ops[t, 0], ops[t, 1], ops[t, 2], ops[t, 3], ops[t, 4]
                col -= n_in
                xs = acts[m * col : m * (col + n_in)]
                ys = acts[m * (col + n_in) : m * (col + n_in) + m * n_out]
                gs = g_out[0 : m * n_out]
                gis = g_in[0 : m * n_in]
                need_input = t > first_param_op
                if code == LINEAR:
                    ws = theta[offsets[wi] : offsets[wi] + n_out * n_in]
                    gws = grad[offsets[wi] : offsets[wi] + n_out * n_in]
                    if grouped and m >= BLAS_MIN_ROWS and n_out >= BLAS_MIN_WIDTH:
                        g2 = gs.reshape((m, n_out))
                        np.dot(g2.T, xs.reshape((m, n_in)), gws.reshape((n_out, n_in)))
                        if need_input:
                            np.dot(g2, ws.reshape((n_out, n_in)), gis.reshape((m, n_in)))
                    else:
                        for r in range(m):
                            for j in range(n_out):
                                gj = gs[r * n_out + j]
                                if r == 0:
                                    for i in range(n_in):
                                        gws[j * n_in + i] = gj * xs[i]
                                else:
                                    for i in range(n_in):
                                        gws[j * n_in + i] += gj * xs[r * n_in + i]
                            if need_input:
                                for i in range(n_in):
                                    gis[r * n_in + i] = 0.0
                                for j in range(n_out):
                                    gj = gs[r * n_out + j]
                                    for i in range(n_in):
                                        gis[r * n_in + i] += gj * ws[j * n_in + i]
                    if bi >= 0:
                        gbs = grad[offsets[bi] : offsets[bi + 1]]
                        for j in range(n_out):
                            gbs[j] = gs[j]
                        for r in range(1, m):
                            for j in range(n_out):
                                gbs[j] += gs[r * n_out + j]
                elif code == LAYER_NORM:
                    ws = theta[offsets[wi] : offsets[wi + 1]] if wi >= 0 else theta[0:0]
                    gws = grad[offsets[wi] : offsets[wi + 1]] if wi >= 0 else grad[0:0]
                    gbs = grad[offsets[bi] : offsets[bi + 1]] if bi >= 0 else grad[0:0]
                    for i in range(gws.shape[0]):
                        gws[i] = 0.0
                    for i in range(gbs.shape[0]):
                        gbs[i] = 0.0
                    inv_n = np.float32(1.0 / n_in)
                    for r in range(m):
                        xr = xs[r * n_in : (r + 1) * n_in]
                        gr = gs[r * n_in : (r + 1) * n_in]
                        mean = aux[2 * (t * rows + r)]
                        rstd = aux[2 * (t * rows + r) + 1]
                        ds = np.float32(0.0)
                        db = np.float32(0.0)
                        if wi >= 0:
                            for i in range(n_in):
                                dy = gr[i]
                                gws[i] += dy * (xr[i] - mean) * rstd
                                ds += dy * ws[i] * xr[i]
                                db += dy * ws[i]
                        else:
                            for i in range(n_in):
                                ds += gr[i] * xr[i]
                                db += gr[i]
                        if bi >= 0:
                            for i in range(n_in):
                                gbs[i] += gr[i]
                        if need_input:
                            # LayerNormBackwardKernelImplInternal: dx = a*dy*gamma + b*x + c
                            gir = gis[r * n_in : (r + 1) * n_in]
                            b_coef = (db * mean - ds) * rstd * rstd * rstd * inv_n
                            c_coef = -b_coef * mean - db * rstd * inv_n
                            if wi >= 0:
                                for i in range(n_in):
                                    gir[i] = rstd * gr[i] * ws[i] + b_coef * xr[i] + c_coef
                            else:
                                for i in range(n_in):
                                    gir[i] = rstd * gr[i] + b_coef * xr[i] + c_coef
                elif need_input:
                    _backward_block(code, gs, xs, ys, gis, np.float32(consts[t]))
                g_out, g_in = g_in, g_out

            # -- optimizer step, parameter by parameter as torch.optim does ------------
            if opt == SGD:
                alpha = np.float32(-lr)  # param.add_(grad, alpha=-lr)
                for i in range(n_theta):
                    theta[i] = theta[i] + alpha * grad[i]
                continue
            for p in range(n_params):
                steps[p] = _advance(steps[p], round_step)
                ps = theta[offsets[p] : offsets[p + 1]]
                gps = grad[offsets[p] : offsets[p + 1]]
                s1s = s1[offsets[p] : offsets[p + 1]]
                if opt == ADAM:
                    s2s = s2[offsets[p] : offsets[p + 1]]
                    c0, c1, c2, c3, c4, c5 = _adam_constants(steps[p], lr, beta1, beta2, eps)
                    for i in range(ps.shape[0]):
                        ps[i], s1s[i], s2s[i] = _adam(ps[i], gps[i], s1s[i], s2s[i], c0, c1, c2, c3, c4, c5)
                elif opt == ADAGRAD:
                    neg_clr = np.float32(-(lr / (1.0 + (steps[p] - 1.0) * lr_decay)))
                    e = np.float32(eps)
                    for i in range(ps.shape[0]):
                        ps[i], s1s[i] = _adagrad(ps[i], gps[i], s1s[i], neg_clr, e)

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
