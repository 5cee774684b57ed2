"""Triton pipeline of the fused channel-wise alignment loss for any channel count: the tile pipeline of
csrc/align_fused.h written as two Triton kernels with K-loops over channel blocks.

Per tile of pixels (whole samples, or a slice of one sample's positions; as in align_fused.h):

    H  = relu(X W1^T + b1)              pixel_gemm, epilogue bias + ReLU            (K-loop over Cs)
    Y  = H W2^T + b2 -> loss, dY, dT    pixel_gemm, epilogue loss, db2 partials     (K-loop over hidden)
    dH = relu'(H) (dY W2)               pixel_gemm, epilogue ReLU backward, db1     (K-loop over Ct)
    dX = dH W1 -> d student             pixel_gemm, epilogue store                  (K-loop over hidden)
    dW2 += dY^T H,  dW1 += dH^T X       weight_gradient                             (K-loop over pixels)

X, the teacher and the feature gradients are read and written where they are (NCHW or channels_last strides);
H, dY and dH live in tile-sized scratch buffers in the compute dtype, so nothing of size pixels x channels
exists beyond a tile. The dots run in the compute dtype (tensor cores for half precision; for float32, TF32 as
torch's matmul precision allows) with float32 accumulators (float64 for float64). Every output element is
written by one program, the loss and bias-gradient partials are summed in a fixed order, and the tiles run in
order: the results are bit-identical run to run. Dot operands are loaded in the compute dtype (features
may be narrower); under the interpreter half precision is loaded in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_helpers import (INTERPRET, align_point, align_teacher_share, dot_precision, launch, launch_size, relu,
                             relu_backward, stored_as)

_BIAS_RELU, _LOSS, _RELU_BACKWARD, _STORE = 0, 1, 2, 3
_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                  torch.float64: tl.float64}
# (pixels, output channels, K) per program; the interpreter's: tl.dot needs every dim >= 16, and small blocks
# keep several programs and K-steps in tiny tests.
_GPU_BLOCKS, _INTERPRETED_BLOCKS = (64, 64, 32), (16, 16, 16)
# Tile scratch budget (H, dY, dH): like the CUDA kernel's, an eighth of what every pixel would take, within
# bounds.
_MIN_TILE_BYTES, _MAX_TILE_BYTES = 8 << 20, 256 << 20


@triton.jit
def _pixel_offsets(q, n0, p0, positions, stride_n, stride_p):
    """Where tile pixels q (sample q // positions of the tile, its position q % positions) start in a tensor
    with sample stride ``stride_n`` and position stride ``stride_p``; 64-bit."""
    sample = q // positions
    return (n0 + sample).to(tl.int64) * stride_n + (p0 + q - sample * positions).to(tl.int64) * stride_p


@triton.jit
def _load(ptr, mask, DOT: tl.constexpr):
    """A masked load of a dot operand in the dots' dtype: features come in their own dtype, which may be
    narrower than the weights' (bfloat16 features under autocast, float32 weights); both operands of tl.dot
    must have one dtype."""
    return tl.load(ptr, mask=mask, other=0.0).to(DOT)


@triton.jit
def _pixel_gemm_kernel(
    a_ptr, a_n0, a_p0, a_sn, a_sc, a_sp,  # A (pixels, K): a pixel operand
    b_ptr, b_sk, b_sn,  # B (K, N): a weight matrix
    out_ptr, out_n0, out_p0, out_sn, out_sc, out_sp,  # out (pixels, N): a pixel operand
    aux_ptr, aux_n0, aux_p0, aux_sn, aux_sc, aux_sp,  # the teacher (LOSS) or H (RELU_BACKWARD)
    d_aux_ptr,  # the teacher's gradient (LOSS, same strides as the teacher)
    bias_ptr, margin_ptr, loss_part_ptr, bias_grad_part_ptr,
    pixels, positions, K, N,
    EPILOGUE: tl.constexpr, HAS_MARGIN: tl.constexpr, GRAD_AUX: tl.constexpr, BIAS_GRAD: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_q, pid_n = tl.program_id(0), tl.program_id(1)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    q_ok, n_ok = q < pixels, n < N
    a_rows = _pixel_offsets(q, a_n0, a_p0, positions, a_sn, a_sp)
    acc = tl.zeros([BLOCK_Q, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = _load(a_ptr + a_rows[:, None] + k[None, :].to(tl.int64) * a_sc, q_ok[:, None] & k_ok[None, :], DOT)
        b = _load(b_ptr + k[:, None].to(tl.int64) * b_sk + n[None, :].to(tl.int64) * b_sn,
                  k_ok[:, None] & n_ok[None, :], DOT)
        acc += tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    valid = q_ok[:, None] & n_ok[None, :]
    out = out_ptr + _pixel_offsets(q, out_n0, out_p0, positions, out_sn, out_sp)[:, None] + \
        n[None, :].to(tl.int64) * out_sc
    aux_offsets = _pixel_offsets(q, aux_n0, aux_p0, positions, aux_sn, aux_sp)[:, None] + \
        n[None, :].to(tl.int64) * aux_sc
    aux = aux_ptr + aux_offsets
    if EPILOGUE == 0:  # _BIAS_RELU: H
        result = relu(acc + tl.load(bias_ptr + n, mask=n_ok, other=0.0)[None, :])
    elif EPILOGUE == 1:  # _LOSS: Y against the teacher, into dY
        y = acc + tl.load(bias_ptr + n, mask=n_ok, other=0.0)[None, :]
        t = tl.load(aux, mask=valid, other=0.0).to(ACC)
        if HAS_MARGIN:
            m = tl.load(margin_ptr + n, mask=n_ok, other=0.0)[None, :]
        else:
            m = tl.zeros([1, BLOCK_N], ACC)  # unused
        terms, result = align_point(y, t, m, HAS_MARGIN)
        result = tl.where(valid, result, 0.0)
        tl.store(loss_part_ptr + pid_q * tl.num_programs(1) + pid_n,
                 tl.sum(tl.sum(tl.where(valid, terms, 0.0), 1), 0))
        if GRAD_AUX:
            # The teacher's gradient has the teacher's strides: same offsets.
            d_t = align_teacher_share(result, t, m, HAS_MARGIN)
            tl.store(d_aux_ptr + aux_offsets, stored_as(d_t, d_aux_ptr), mask=valid)
    elif EPILOGUE == 2:  # _RELU_BACKWARD: dH
        result = tl.where(valid, relu_backward(acc, tl.load(aux, mask=valid, other=0.0).to(ACC)), 0.0)
    else:  # _STORE
        result = acc
    if BIAS_GRAD:
        tl.store(bias_grad_part_ptr + pid_q.to(tl.int64) * N + n, tl.sum(result, 0), mask=n_ok)
    tl.store(out, stored_as(result, out_ptr), mask=valid)


@triton.jit
def _weight_gradient_kernel(
    a_ptr, a_n0, a_p0, a_sn, a_sc, a_sp,  # A (pixels, M): a pixel operand
    b_ptr, b_n0, b_p0, b_sn, b_sc, b_sp,  # B (pixels, N): a pixel operand
    out_ptr,  # (M, N) contiguous, accumulation dtype: out += A^T B
    pixels, positions, M, N,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for q0 in range(0, pixels, BLOCK_K):  # pixels in order: a fixed summation order
        q = q0 + tl.arange(0, BLOCK_K)
        q_ok = q < pixels
        a = _load(a_ptr + _pixel_offsets(q, a_n0, a_p0, positions, a_sn, a_sp)[:, None] +
                  m[None, :].to(tl.int64) * a_sc, q_ok[:, None] & m_ok[None, :], DOT)
        b = _load(b_ptr + _pixel_offsets(q, b_n0, b_p0, positions, b_sn, b_sp)[:, None] +
                  n[None, :].to(tl.int64) * b_sc, q_ok[:, None] & n_ok[None, :], DOT)
        acc += tl.dot(tl.trans(a), b, input_precision=PRECISION, out_dtype=ACC)
    out = out_ptr + m[:, None].to(tl.int64) * N + n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)


class _PixelOperand:
    """A (pixels, channels) operand of one tile: a feature (its own strides, the tile's first sample and
    position) or a tile scratch buffer (contiguous pixels x channels)."""

    def __init__(self, tensor, n0, p0, stride_n, stride_c, stride_p):
        self.args = (tensor, n0, p0, stride_n, stride_c, stride_p)

    @classmethod
    def feature(cls, merged, tile):
        n0, _samples, p0, _positions = tile
        return cls(merged, n0, p0, merged.stride(0), merged.stride(1), merged.stride(2))

    @classmethod
    def scratch(cls, buffer, tile, channels):
        positions = tile[3]
        return cls(buffer, 0, 0, positions * channels, 1, channels)


def _tiles(batch, positions, tile_pixels):
    """(first sample, samples, first position, positions) of the tiles, as align_tiles in csrc/align_fused.h."""
    if positions >= tile_pixels:
        return [(n, 1, p, min(tile_pixels, positions - p))
            for n in range(batch) for p in range(0, positions, tile_pixels)]
    samples = max(tile_pixels // max(positions, 1), 1)
    return [(n, min(samples, batch - n), 0, positions) for n in range(0, batch, samples)]


def align_tiled_triton(student3, teacher3, w1, b1, w2, b2, margin, d_student3, d_teacher3, d_weights):
    """The pipeline over (N, C, positions) features: weights in the compute dtype, biases and margin (or None) in
    the accumulation dtype; writes d_student3 / d_teacher3 when given and accumulates into d_weights (dW1, db1,
    dW2, db2 in the accumulation dtype) when given. Returns the loss sum (0-dim, accumulation dtype)."""
    compute = w1.dtype
    acc = b1.dtype
    batch, s_channels, positions = student3.shape
    hidden, t_channels = w1.shape[0], w2.shape[0]
    loss = torch.zeros((), dtype=acc, device=w1.device)
    if batch * positions == 0:
        return loss
    bytes_per_pixel = (2 * hidden + t_channels) * w1.element_size()
    tile_bytes = min(max(batch * positions * bytes_per_pixel // 8, _MIN_TILE_BYTES), _MAX_TILE_BYTES)
    tiles = _tiles(batch, positions, max(128, tile_bytes // bytes_per_pixel))
    most = tiles[0][1] * tiles[0][3]
    h_buffer = torch.empty(most * hidden, dtype=compute, device=w1.device)
    y_buffer = torch.empty(most * t_channels, dtype=compute, device=w1.device)
    backward = d_student3 is not None or d_weights is not None
    dh_buffer = torch.empty(most * hidden, dtype=compute, device=w1.device) if backward else None
    # The dots run in the compute dtype; under the interpreter, half precision in float32 (its half-precision
    # dots are wrong).
    dot = _TRITON_DTYPES[torch.float32 if INTERPRET and compute.itemsize == 2 else compute]
    block_q, block_n, block_k = launch_size(gpu=_GPU_BLOCKS, interpreted=_INTERPRETED_BLOCKS)
    meta = dict(ACC=_TRITON_DTYPES[acc], DOT=dot, PRECISION=dot_precision(compute), BLOCK_K=block_k)
    unused = _PixelOperand(b1, 0, 0, 0, 0, 0)  # any tensor: the kernel never reads an operand it does not use

    def gemm(a, weight_k_n, out, N, K, epilogue, aux=unused, d_aux=None, bias=b1, loss_parts=None,
             bias_grad_parts=None):
        grid = (triton.cdiv(pixels, block_q), triton.cdiv(N, block_n))
        launch(_pixel_gemm_kernel, grid, *a.args, weight_k_n, weight_k_n.stride(0), weight_k_n.stride(1),
               *out.args, *aux.args, d_aux if d_aux is not None else b1, bias,
               margin if margin is not None else b1, loss_parts if loss_parts is not None else b1,
               bias_grad_parts if bias_grad_parts is not None else b1, pixels, positions_in_tile, K, N,
               device=w1.device, EPILOGUE=epilogue, HAS_MARGIN=margin is not None, GRAD_AUX=d_aux is not None,
               BIAS_GRAD=bias_grad_parts is not None, BLOCK_Q=block_q, BLOCK_N=block_n, **meta)

    def weight_gradient(a, b, out):
        M, N = out.shape
        grid = (triton.cdiv(M, block_n), triton.cdiv(N, block_n))
        launch(_weight_gradient_kernel, grid, *a.args, *b.args, out, pixels, positions_in_tile, M, N,
               device=w1.device, BLOCK_M=block_n, BLOCK_N=block_n, **meta)

    for tile in tiles:
        pixels, positions_in_tile = tile[1] * tile[3], tile[3]
        x = _PixelOperand.feature(student3, tile)
        h = _PixelOperand.scratch(h_buffer, tile, hidden)
        y = _PixelOperand.scratch(y_buffer, tile, t_channels)
        q_blocks = triton.cdiv(pixels, block_q)
        gemm(x, w1.t(), h, hidden, s_channels, _BIAS_RELU)
        loss_parts = torch.empty(q_blocks * triton.cdiv(t_channels, block_n), dtype=acc, device=w1.device)
        db2_parts = torch.empty((q_blocks, t_channels), dtype=acc, device=w1.device) if d_weights else None
        gemm(h, w2.t(), y, t_channels, hidden, _LOSS, aux=_PixelOperand.feature(teacher3, tile),
             d_aux=d_teacher3, bias=b2, loss_parts=loss_parts, bias_grad_parts=db2_parts)
        loss += loss_parts.sum()
        if not backward:
            continue
        dh = _PixelOperand.scratch(dh_buffer, tile, hidden)
        db1_parts = torch.empty((q_blocks, hidden), dtype=acc, device=w1.device) if d_weights else None
        gemm(y, w2, dh, hidden, t_channels, _RELU_BACKWARD, aux=h, bias_grad_parts=db1_parts)
        if d_weights:
            d_w1, d_b1, d_w2, d_b2 = d_weights
            weight_gradient(y, h, d_w2)
            weight_gradient(dh, x, d_w1)
            d_b2 += db2_parts.sum(0)
            d_b1 += db1_parts.sum(0)
        if d_student3 is not None:
            gemm(dh, w1, _PixelOperand.feature(d_student3, tile), s_channels, hidden, _STORE)
    return loss
