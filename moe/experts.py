"""Routed SwiGLU experts with dropless dispatch.

Every (token, chosen expert) pair is processed; nothing is dropped for capacity. The pairs are
sorted by expert so that each expert's rows are contiguous, then the experts run either as one
``torch._grouped_mm`` per projection or as a loop of plain matmuls over each expert's rows. The
outputs, scaled by the gate weights, are summed back per token.

Dispatch and combine are permutations, so their backward passes are gathers through the inverse
permutation rather than the scatter-adds (``index_add_``) autograd would derive, several times
slower on CPU. The experts' SwiGLU is one autograd function that keeps only its input rows and the
gate/up projection and recomputes the activation in the backward pass.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .router import Routing

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_BYTES = 16 << 20


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, dims: tuple[int, ...]) -> bool:
    """Whether ``torch._grouped_mm`` runs for these operands: a kernel for the device and dtype,
    and row strides (the dims) that are multiples of 16 bytes, as the kernels require."""
    if not hasattr(torch, "_grouped_mm") or dtype not in _GROUPED_MM_DTYPES:
        return False
    if any(d * torch.finfo(dtype).bits // 8 % 16 for d in dims):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def _swiglu(gate_up_out: torch.Tensor, hidden: int) -> torch.Tensor:
    """silu(gate) * up from the [rows, 2H] output of the fused gate/up projection."""
    act = F.silu(gate_up_out[:, :hidden])
    return act.mul_(gate_up_out[:, hidden:])


def _swiglu_backward(gate_up_out: torch.Tensor, silu_gate: torch.Tensor, grad_act: torch.Tensor,
                     hidden: int) -> torch.Tensor:
    """Gradient with respect to gate_up_out, given silu(gate); overwrites grad_act."""
    grad = torch.empty_like(gate_up_out)
    torch.mul(grad_act, silu_gate, out=grad[:, hidden:])
    grad_act.mul_(gate_up_out[:, hidden:])
    torch.ops.aten.silu_backward.grad_input(grad_act, gate_up_out[:, :hidden], grad_input=grad[:, :hidden])
    return grad


class _GroupedSwiGLU(torch.autograd.Function):
    """y[rows of e] = SwiGLU_e(rows of e) for rows sorted by expert, one torch._grouped_mm per product.

    gate_up [E, D, 2H] holds W_gate in its first H columns and W_up in the last H; down is [E, H, D].
    Only the input rows and the gate/up output are kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        gate_up_out = torch._grouped_mm(rows, gate_up, offs=offsets)
        out = torch._grouped_mm(_swiglu(gate_up_out, down.shape[1]), down, offs=offsets)
        ctx.save_for_backward(rows, gate_up_out, gate_up, down, offsets, counts)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, gate_up_out, gate_up, down, offsets, counts = ctx.saved_tensors
        hidden = down.shape[1]
        grad_out = grad_out.contiguous()
        silu_gate = F.silu(gate_up_out[:, :hidden])
        grad_down = torch._grouped_mm((silu_gate * gate_up_out[:, hidden:]).t(), grad_out, offs=offsets)
        grad_act = torch._grouped_mm(grad_out, down.transpose(1, 2), offs=offsets)
        grad_gate_up_out = _swiglu_backward(gate_up_out, silu_gate, grad_act, hidden)
        del silu_gate, grad_act
        grad_rows = torch._grouped_mm(grad_gate_up_out, gate_up.transpose(1, 2), offs=offsets)
        grad_gate_up = torch._grouped_mm(rows.t(), grad_gate_up_out, offs=offsets)
        # The weight gradients of experts without tokens must be zero, whatever the kernel leaves there.
        idle = counts == 0
        grad_gate_up[idle] = 0
        grad_down[idle] = 0
        return grad_rows, grad_gate_up, grad_down, None


class _BlockedSwiGLU(torch.autograd.Function):
    """The same function, one plain matmul per expert and block of rows.

    Each block's SwiGLU and its gradient are computed right after its matmul, while the block is
    still in cache, and every temporary is one block in size: on CPU this avoids the page faults of
    allocating whole-batch temporaries (glibc returns allocations above 32 MiB to the system on free).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, blocks: list) -> torch.Tensor:
        hidden = down.shape[1]
        gate_up_out = rows.new_empty(rows.shape[0], gate_up.shape[2])
        out = rows.new_empty(rows.shape[0], down.shape[2])
        for expert, start, end, _ in blocks:
            block = torch.mm(rows[start:end], gate_up[expert], out=gate_up_out[start:end])
            torch.mm(_swiglu(block, hidden), down[expert], out=out[start:end])
        ctx.save_for_backward(rows, gate_up_out, gate_up, down)
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, gate_up_out, gate_up, down = ctx.saved_tensors
        hidden = down.shape[1]
        grad_out = grad_out.contiguous()
        grad_rows = torch.empty_like(rows)
        grad_gate_up = torch.empty_like(gate_up) if ctx.needs_input_grad[1] else None
        grad_down = torch.empty_like(down)
        idle = sorted(set(range(gate_up.shape[0])) - {expert for expert, *_ in ctx.blocks})
        grad_down[idle] = 0
        if grad_gate_up is not None:
            grad_gate_up[idle] = 0
        for expert, start, end, first in ctx.blocks:
            block, grad_block = gate_up_out[start:end], grad_out[start:end]
            silu_gate = F.silu(block[:, :hidden])
            act = silu_gate * block[:, hidden:]
            _mm_into(grad_down[expert], act.t(), grad_block, first)
            grad_act = torch.mm(grad_block, down[expert].t())
            grad_block_out = _swiglu_backward(block, silu_gate, grad_act, hidden)
            torch.mm(grad_block_out, gate_up[expert].t(), out=grad_rows[start:end])
            if grad_gate_up is not None:
                _mm_into(grad_gate_up[expert], rows[start:end].t(), grad_block_out, first)
        return grad_rows, grad_gate_up, grad_down, None


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """out = a @ b for an expert's first block, out += a @ b for the next ones."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _block_rows(width: int, element_size: int) -> int:
    """Rows per block of the per-expert loop: [rows, width] temporaries of about _BLOCK_BYTES, and
    at least 256 rows so that each matmul stays efficient."""
    return max(256, _BLOCK_BYTES // (width * element_size))


def _row_blocks(counts: list[int], max_rows: int) -> list[tuple[int, int, int, bool]]:
    """(expert, start, end, first block of the expert) for rows sorted by expert, at most max_rows each."""
    blocks, start = [], 0
    for expert, count in enumerate(counts):
        for offset in range(0, count, max_rows):
            blocks.append((expert, start + offset, start + min(count, offset + max_rows), offset == 0))
        start += count
    return blocks


class _Dispatch(torch.autograd.Function):
    """rows[j] = x[token[j]]: each token copied once per chosen expert, in expert order.

    The backward is a gather through the inverse permutation and a sum over each token's k copies,
    not the scatter-add autograd would use for ``index_select``, which is several times slower on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.num_tokens = x.shape[0]
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_x = grad_rows.index_select(0, inverse).view(ctx.num_tokens, -1, grad_rows.shape[1]).sum(1)
        return grad_x, None, None


class _Combine(torch.autograd.Function):
    """out[n] = sum over the k pairs j of token n of weight[j] * rows[j]: the adjoint of _Dispatch."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor, token: torch.Tensor,
                inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(rows, weights, token)
        weighted = rows * weights.unsqueeze(1).to(rows.dtype)
        return weighted.index_select(0, inverse).view(-1, top_k, rows.shape[1]).sum(1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weights, token = ctx.saved_tensors
        grad_pairs = grad_out.to(rows.dtype).index_select(0, token)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = torch.linalg.vecdot(grad_pairs, rows).to(weights.dtype)
        grad_rows = grad_pairs.mul_(weights.unsqueeze(1).to(rows.dtype))
        return grad_rows, grad_weights, None, None, None


class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D weights: ``gate_up`` [E, dim, 2*hidden], ``down`` [E, hidden, dim].

    ``impl``: ``grouped_mm`` (``torch._grouped_mm``; an error where it cannot run), ``loop`` (one
    matmul per expert and block of rows) or ``auto`` (the loop on CPU; grouped_mm on GPUs where it
    runs, else the loop).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, impl: str = "auto"):
        super().__init__()
        if impl not in ("auto", "grouped_mm", "loop"):
            raise UserError(f"moe.impl={impl!r} is not a dispatch implementation; valid: auto, grouped_mm, loop")
        self.impl = impl
        self.gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.init_weights(0.02, 0.02)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) input projections and Normal(0, out_std) output projections."""
        nn.init.normal_(self.gate_up, mean=0.0, std=std)
        nn.init.normal_(self.down, mean=0.0, std=out_std)

    def _use_grouped_mm(self, dtype: torch.dtype, device: torch.device) -> bool:
        # auto: on GPUs one grouped kernel beats a launch per expert; on CPU the blocked loop was the
        # faster in benchmarks/moe.py, and it holds block-sized temporaries, not whole-batch ones.
        if self.impl == "loop" or (self.impl == "auto" and device.type == "cpu"):
            return False
        dim, hidden = self.down.shape[2], self.down.shape[1]
        supported = grouped_mm_supported(dtype, device, (dim, hidden))
        if self.impl == "grouped_mm" and not supported:
            raise UserError(f"moe.impl=grouped_mm cannot run for dtype {dtype} on {device.type} with dim={dim}, "
                            f"expert hidden size={hidden} (rows must be multiples of 16 bytes); use moe.impl=auto")
        return supported

    def forward(self, x: torch.Tensor, routing: Routing, counts: torch.Tensor) -> torch.Tensor:
        """x [N, dim], the routing of its N tokens and the per-expert counts of chosen pairs -> [N, dim]."""
        top_k = routing.experts.shape[1]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # Pair p = n * top_k + slot is token n's slot-th choice; sorted position j holds pair order[j].
        order = routing.experts.flatten().argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0], device=order.device)
        token = order.div(top_k, rounding_mode="floor")
        gate_up, down = self.gate_up.to(dtype), self.down.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            rows = _Dispatch.apply(x.to(dtype), token, inverse)
            if self._use_grouped_mm(dtype, x.device):
                out_rows = _GroupedSwiGLU.apply(rows, gate_up, down, counts)
            else:
                blocks = _row_blocks(counts.tolist(), _block_rows(gate_up.shape[2], gate_up.element_size()))
                out_rows = _BlockedSwiGLU.apply(rows, gate_up, down, blocks)
            return _Combine.apply(out_rows, routing.weights.flatten()[order], token, inverse, top_k)

    def flops_per_token(self, top_k: int) -> int:
        """Matmul FLOPs of one token's forward pass through its k experts (backward is twice this)."""
        dim, hidden = self.down.shape[2], self.down.shape[1]
        return 2 * top_k * 3 * dim * hidden

    def extra_repr(self) -> str:
        e, d, h2 = self.gate_up.shape
        return f"num_experts={e}, dim={d}, hidden={h2 // 2}, impl={self.impl}"

