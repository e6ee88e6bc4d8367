"""Routed SwiGLU experts with dropless dispatch.

Every (token, chosen expert) pair is processed; nothing is dropped for capacity. The pairs are
sorted by expert so each expert's tokens are one contiguous block of rows, then each projection
is one grouped matmul over those blocks (``torch._grouped_mm``) or one plain matmul per expert.
The outputs, scaled by the gate weights, are summed back into token order with ``index_add_``.

The SwiGLU of all experts is one autograd function: it keeps only its input rows and the
gate/up projection for the backward pass and recomputes the activation there, so an MoE layer holds
no more activation memory than its dense equivalent at the same active width.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .router import Routing

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


class _GroupedProducts:
    """The three products of a grouped linear layer over expert blocks of rows.

    Rows ``ends[e-1]:ends[e]`` of the inputs belong to expert e. ``grouped`` selects
    ``torch._grouped_mm``; otherwise one ``torch.mm`` per expert writes into its slice of the output.
    """

    def __init__(self, counts: torch.Tensor, grouped: bool):
        self.grouped = grouped
        self.offsets = counts.cumsum(0).to(torch.int32)
        ends = self.offsets.tolist()
        self.blocks = [(e, start, end) for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)) if end > start]
        self.empty = [e for e, n in enumerate(counts.tolist()) if n == 0]

    def forward(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows [S, K] @ weight[e] [K, N] for each expert's block -> [S, N]."""
        if self.grouped:
            return torch._grouped_mm(rows, weight, offs=self.offsets)
        out = rows.new_empty(rows.shape[0], weight.shape[2])
        for e, start, end in self.blocks:
            torch.mm(rows[start:end], weight[e], out=out[start:end])
        return out

    def weight_grad(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """rows[block e].T @ grad[block e] for each expert -> [E, K, N]; zero for experts without tokens."""
        num_experts = self.offsets.shape[0]
        if self.grouped:
            out = torch._grouped_mm(rows.t(), grad, offs=self.offsets)
            if self.empty:
                out[self.empty] = 0
            return out
        out = rows.new_zeros(num_experts, rows.shape[1], grad.shape[1]) if self.empty else \
            rows.new_empty(num_experts, rows.shape[1], grad.shape[1])
        for e, start, end in self.blocks:
            torch.mm(rows[start:end].t(), grad[start:end], out=out[e])
        return out


class _SwiGLUExperts(torch.autograd.Function):
    """y[rows of e] = (silu(x W_g[e]) * x W_u[e]) W_d[e] for rows sorted by expert e.

    gate_up [E, D, 2H] holds W_g in its first H columns and W_u in the last H; down is [E, H, D].
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                products: _GroupedProducts) -> torch.Tensor:
        hidden = down.shape[1]
        with torch.autocast(rows.device.type, enabled=False):
            gate_up_out = products.forward(rows, gate_up)
            act = F.silu(gate_up_out[:, :hidden])
            act.mul_(gate_up_out[:, hidden:])
            out = products.forward(act, down)
        ctx.save_for_backward(rows, gate_up_out, gate_up, down)
        ctx.products = products
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, gate_up_out, gate_up, down = ctx.saved_tensors
        products: _GroupedProducts = ctx.products
        hidden = down.shape[1]
        gate, up = gate_up_out[:, :hidden], gate_up_out[:, hidden:]
        with torch.autocast(rows.device.type, enabled=False):
            grad_out = grad_out.contiguous().to(rows.dtype)
            silu_gate = F.silu(gate)
            grad_down = products.weight_grad(silu_gate * up, grad_out)
            grad_act = products.forward(grad_out, down.transpose(1, 2))
            grad_gate_up = torch.empty_like(gate_up_out)
            torch.mul(grad_act, silu_gate, out=grad_gate_up[:, hidden:])
            del silu_gate
            grad_act.mul_(up)
            torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_gate_up[:, :hidden])
            del grad_act
            grad_rows = products.forward(grad_gate_up, gate_up.transpose(1, 2))
            grad_weight_gate_up = products.weight_grad(rows, grad_gate_up)
        return grad_rows, grad_weight_gate_up, grad_down, None


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
    matmul per expert) or ``auto`` (grouped_mm where it runs, else the loop).
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
        if self.impl == "loop":
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
        products = _GroupedProducts(counts, self._use_grouped_mm(dtype, x.device))
        rows = _Dispatch.apply(x.to(dtype), token, inverse)
        out_rows = _SwiGLUExperts.apply(rows, self.gate_up.to(dtype), self.down.to(dtype), products)
        return _Combine.apply(out_rows, routing.weights.flatten()[order], token, inverse, top_k)

    def flops_per_token(self, top_k: int) -> int:
        """Matmul FLOPs of one token's forward pass through its k experts (backward is twice this)."""
        dim, hidden = self.down.shape[2], self.down.shape[1]
        return 2 * top_k * 3 * dim * hidden

    def extra_repr(self) -> str:
        e, d, h2 = self.gate_up.shape
        return f"num_experts={e}, dim={d}, hidden={h2 // 2}, impl={self.impl}"

