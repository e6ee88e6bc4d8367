"""Triton kernels of cut cross-entropy (CUDA, Triton >= 3.0). Imported by ``cut_ce`` only when they run.

The paper's two kernels, over the valid rows of ``e`` (``rows`` maps them into ``e``; None: all):

- ``lse_forward``: each program takes a block of rows and a range of the vocabulary, computes logit
  tiles ``e_block @ c_block.T`` in registers and keeps an online log-sum-exp and the target's logit.
  The ranges' partial results (``splits x rows`` floats) are merged by ``torch.logsumexp``.
- ``grad_backward``: one program per (row block, vocabulary block) tile recomputes the logits, forms
  ``g = softmax * softmax_scale - onehot * target_scale`` (times ``1 - tanh**2`` when soft-capped)
  and adds ``g @ c`` into dE and ``g.T @ e`` into dC with fp32 atomics. With ``filter_eps`` a tile
  whose ``|softmax - onehot|`` entries are all below it is skipped; ``order`` (vocabulary sorted by
  average logit) makes such tiles common by grouping the likely classes.

Nothing of size ``N x V`` is ever written to memory. Tile shapes come from ``cut_ce.triton_tiles``.
"""

import types

import torch
import triton
import triton.language as tl

from .cut_ce import triton_tiles, vocab_splits


@triton.jit
def _tanh_from_exp(x):
    # Exact at both tails; near 0 its absolute error is about one float32 ulp of 1.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


# Kernels call ``libdevice.tanh`` through the module, as Triton's backends resolve libdevice modules.
try:
    from triton.language.extra import libdevice  # Triton >= 3.1
except ImportError:
    try:
        from triton.language.extra.cuda import libdevice  # Triton 3.0
    except ImportError:
        libdevice = types.ModuleType("libdevice")  # Triton resolves module attributes inside kernels
        libdevice.tanh = _tanh_from_exp


@triton.jit
def _logit_tile(E, C, e_rows, m_mask, cols, v_mask, dim, stride_e, stride_c,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 ``E[e_rows] @ C[cols].T`` for one tile, accumulated over D in BLOCK_D steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        e = tl.load(E + e_rows[:, None] * stride_e + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        c = tl.load(C + cols[None, :] * stride_c + offs_d[:, None], mask=v_mask[None, :] & d_mask[:, None], other=0.0)
        acc = tl.dot(e, c, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lse_forward_kernel(
    E, C, Bias, Rows, Targets, PartLse, PartTarget,
    n_rows, vocab, dim, v_per_split, stride_e, stride_c, softcap,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    if HAS_ROWS:
        e_rows = tl.load(Rows + offs_m, mask=m_mask, other=0).to(tl.int64)
    else:
        e_rows = offs_m.to(tl.int64)
    targets = tl.load(Targets + offs_m, mask=m_mask, other=-1)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, vocab)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_hi
        cols = offs_v.to(tl.int64)
        logits = _logit_tile(E, C, e_rows, m_mask, cols, v_mask, dim, stride_e, stride_c,
                             BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION)
        if HAS_BIAS:
            logits += tl.load(Bias + cols, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            logits = softcap * libdevice.tanh(logits / softcap)
        logits = tl.where(v_mask[None, :], logits, float("-inf"))
        is_target = (cols[None, :] == targets[:, None]) & v_mask[None, :]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max

    out = split * n_rows + offs_m
    tl.store(PartLse + out, run_max + tl.log(run_sum), mask=m_mask)
    tl.store(PartTarget + out, target_logit, mask=m_mask)


@triton.jit
def _grad_kernel(
    E, C, Bias, Rows, Targets, Lse, SoftmaxScale, TargetScale, Order, dE, dC, dBias,
    n_rows, vocab, dim, stride_e, stride_c, softcap, filter_eps,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ORDER: tl.constexpr,
    FILTER: tl.constexpr, COMPUTE_DE: tl.constexpr, COMPUTE_DC: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # GROUP_M row blocks run side by side on one vocabulary block, so its c rows stay in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(vocab, BLOCK_V)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    if HAS_ROWS:
        e_rows = tl.load(Rows + offs_m, mask=m_mask, other=0).to(tl.int64)
    else:
        e_rows = offs_m.to(tl.int64)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < vocab
    if HAS_ORDER:
        cols = tl.load(Order + offs_v, mask=v_mask, other=0).to(tl.int64)
    else:
        cols = offs_v.to(tl.int64)

    logits = _logit_tile(E, C, e_rows, m_mask, cols, v_mask, dim, stride_e, stride_c,
                         BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION)
    if HAS_BIAS:
        logits += tl.load(Bias + cols, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        capped = libdevice.tanh(logits / softcap)
        logits = softcap * capped
    lse = tl.load(Lse + offs_m, mask=m_mask, other=0.0)
    probs = tl.exp(logits - lse[:, None])
    probs = tl.where(m_mask[:, None] & v_mask[None, :], probs, 0.0)
    targets = tl.load(Targets + offs_m, mask=m_mask, other=-1)
    is_target = (cols[None, :] == targets[:, None]) & v_mask[None, :]
    if FILTER:
        below = tl.abs(probs - tl.where(is_target, 1.0, 0.0))
        if tl.max(tl.max(below, axis=1), axis=0) < filter_eps:
            return

    softmax_scale = tl.load(SoftmaxScale + offs_m, mask=m_mask, other=0.0)
    target_scale = tl.load(TargetScale + offs_m, mask=m_mask, other=0.0)
    grad = probs * softmax_scale[:, None] - tl.where(is_target, target_scale[:, None], 0.0)
    if HAS_SOFTCAP:
        grad = grad * (1.0 - capped * capped)
    if COMPUTE_DBIAS:
        tl.atomic_add(dBias + cols, tl.sum(grad, axis=0), mask=v_mask, sem="relaxed")
    grad_mm = grad.to(E.dtype.element_ty)

    if COMPUTE_DE:
        de_rows = offs_m.to(tl.int64)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < dim
            c = tl.load(C + cols[:, None] * stride_c + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :],
                        other=0.0)
            de = tl.dot(grad_mm, c, input_precision=DOT_PRECISION)
            tl.atomic_add(dE + de_rows[:, None] * dim + offs_d[None, :], de, mask=m_mask[:, None] & d_mask[None, :],
                          sem="relaxed")
    if COMPUTE_DC:
        grad_t = tl.trans(grad_mm)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < dim
            e = tl.load(E + e_rows[:, None] * stride_e + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                        other=0.0)
            dc = tl.dot(grad_t, e, input_precision=DOT_PRECISION)
            tl.atomic_add(dC + cols[:, None] * dim + offs_d[None, :], dc, mask=v_mask[:, None] & d_mask[None, :],
                          sem="relaxed")


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> None:
    if not (e.is_cuda and c.is_cuda and e.dtype == c.dtype and e.is_contiguous() and c.is_contiguous()):
        raise ValueError("cut_ce_triton: e and c must be contiguous CUDA tensors of one dtype")
    if targets.dtype != torch.int64 or not targets.is_contiguous():
        raise ValueError("cut_ce_triton: targets must be contiguous int64")


def lse_forward(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None,
                targets: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-sum-exp and target logit of every valid row, without materialising the logits."""
    _check(e, c, targets)
    n_rows = targets.numel()
    vocab, dim = c.shape
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=e.device)
        return empty, empty.clone()
    tiles = triton_tiles(e.dtype, backward=False)
    sm_count = torch.cuda.get_device_properties(e.device).multi_processor_count
    splits, per_split = vocab_splits(n_rows, vocab, tiles, sm_count)
    partial = torch.empty((2, splits, n_rows), dtype=torch.float32, device=e.device)
    grid = (triton.cdiv(n_rows, tiles.block_m), splits)
    _lse_forward_kernel[grid](
        e, c, bias.contiguous() if bias is not None else c, rows if rows is not None else targets, targets,
        partial[0], partial[1],
        n_rows, vocab, dim, per_split, e.stride(0), c.stride(0), float(softcap or 1.0),
        HAS_ROWS=rows is not None, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_M=tiles.block_m, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d, DOT_PRECISION=_dot_precision(e.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return torch.logsumexp(partial[0], dim=0), partial[1].sum(dim=0)


def grad_backward(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None,
                  targets: torch.Tensor, lse: torch.Tensor, softmax_scale: torch.Tensor, target_scale: torch.Tensor,
                  order: torch.Tensor | None, softcap: float | None, filter_eps: float | None,
                  need_de: bool, need_dc: bool, need_dbias: bool,
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fp32 dE of the valid rows ``[rows, D]``, dC ``[V, D]`` and dbias ``[V]`` (None where not needed)."""
    _check(e, c, targets)
    n_rows = targets.numel()
    vocab, dim = c.shape
    f32 = dict(dtype=torch.float32, device=e.device)
    de = torch.zeros((n_rows, dim), **f32) if need_de else None
    dc = torch.zeros((vocab, dim), **f32) if need_dc else None
    dbias = torch.zeros(vocab, **f32) if need_dbias else None
    if n_rows == 0 or not (need_de or need_dc or need_dbias):
        return de, dc, dbias
    tiles = triton_tiles(e.dtype, backward=True)
    grid = (triton.cdiv(n_rows, tiles.block_m) * triton.cdiv(vocab, tiles.block_v),)
    _grad_kernel[grid](
        e, c, bias.contiguous() if bias is not None else c, rows if rows is not None else targets, targets,
        lse.contiguous(), softmax_scale.contiguous(), target_scale.contiguous(),
        order.contiguous() if order is not None else targets,
        de if de is not None else lse, dc if dc is not None else lse, dbias if dbias is not None else lse,
        n_rows, vocab, dim, e.stride(0), c.stride(0), float(softcap or 1.0), float(filter_eps or 0.0),
        HAS_ROWS=rows is not None, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        HAS_ORDER=order is not None, FILTER=filter_eps is not None,
        COMPUTE_DE=need_de, COMPUTE_DC=need_dc, COMPUTE_DBIAS=need_dbias,
        BLOCK_M=tiles.block_m, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d, GROUP_M=8,
        DOT_PRECISION=_dot_precision(e.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return de, dc, dbias
