"""Cut cross-entropy: the linear-plus-cross-entropy loss that never materialises the logits.

``linear_cross_entropy(e, c, targets)`` equals ``F.cross_entropy((e @ c.T).float(), targets)`` (plus an
optional bias, logit soft-capping, a PaLM z-loss and next-token shifting), following "Cut Your Losses
in Large-Vocabulary Language Models" and the argument names of Apple's ``cut-cross-entropy``.

Implementations (``impl``):

- ``"torch"`` runs on every device. It walks the tokens in chunks sized from ``chunk_bytes`` so that
  the largest temporary is one chunk of logits ``[rows, V]`` in fp32; the log-sum-exp is always
  accumulated in fp32.
- ``"triton"`` (CUDA) is the paper's kernel pair in ``cut_ce_triton``: a forward that keeps the
  log-sum-exp in registers and a backward that recomputes logit tiles, with no ``[N, V]`` buffer.
- ``"naive"`` materialises the logits; it is the reference for tests and benchmarks.
- ``"auto"`` picks ``"triton"`` for CUDA tensors on an Ampere-or-newer GPU with Triton importable,
  and ``"torch"`` otherwise. Asking for ``"triton"`` where it cannot run is an error, never a fallback.

Why the torch path computes the gradients in the forward. The naive loss costs three matmuls over
``N x V x D``: logits, ``dE = G @ C`` and ``dC = G^T @ E``. Recomputing the logits in the backward
(the kernel's scheme) costs a fourth. A chunk of *all* vocabulary columns for a few tokens already
holds the exact softmax of those tokens, so the forward can finish their gradient on the spot: three
matmuls in all, the same as the naive loss. For a scalar loss (``"mean"``/``"sum"``) the upstream
gradient is one number, so the backward only scales the stored ``dE``/``dC`` in place; those buffers
are the gradients any method must return, handed to autograd without a copy. ``reduction="none"``
weights every token by its own upstream gradient, unknown in the forward, so it keeps the log-sum-exp
and recomputes in the backward (four matmuls); so does the gradient of a returned ``lse``, added by
one extra pass only when it is used.

Gradient filtering (``filter_eps``) follows the paper: the vocabulary is sorted by average logit and
cut into blocks of ``FILTER_BLOCK_V``; a block whose ``|softmax - onehot|`` entries are all below eps
is left out of ``dE`` and ``dC``. The torch path decides per block and token chunk (and keeps the
bias gradient exact), the kernel per block and 64-token tile. The loss is never filtered.

Dtypes. The matmuls run in the autocast dtype when autocast is on for the device (as a ``Linear``
would), else in the promotion of ``e.dtype`` and ``c.dtype``. Logits, log-sum-exp, softmax and the
``dC`` accumulator are fp32; the loss is fp32; the gradients come back in each input's own dtype.
A bf16 matmul on the torch path returns bf16 logits, rounded before the fp32 softmax as a bf16
``Linear`` would round them; the kernels keep the fp32 accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import UserError

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 128 * 2**20
"""Budget for the largest temporary of the torch path: one chunk of fp32 logits (plus its companions)."""
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton", "naive")
FILTER_BLOCK_V = 128
"""Vocabulary block of gradient filtering: the unit that is skipped (the kernel's ``BLOCK_V``)."""
DENSE_ABOVE_KEPT = 0.5
"""Above this fraction of kept vocabulary, dense matmuls beat gathering the kept columns."""


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool | int = 0,
    return_lse: bool = False,
    filter_eps: float | str | None = None,
    impl: str = "auto",
    z_loss: float = 0.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits ``e @ c.T (+ bias)`` against ``targets``, without the logit matrix.

    e: ``[..., D]`` hidden states; c: ``[V, D]`` classifier (output head weight); targets: ``[...]``
    integer classes, ``ignore_index`` for tokens without a loss. ``softcap`` applies
    ``softcap * tanh(logit / softcap)``. ``shift=n`` makes ``e[..., :-n, :]`` predict
    ``targets[..., n:]`` without copying ``e``. ``z_loss`` adds ``z_loss * lse**2`` per token (PaLM).
    ``reduction``: ``"mean"`` over non-ignored tokens, ``"sum"``, or ``"none"`` for per-token losses
    shaped like ``targets[..., shift:]`` (0 where ignored). ``return_lse`` also returns the fp32
    log-sum-exp in that shape (0 where ignored), differentiable. ``filter_eps`` (None, ``"auto"`` =
    machine epsilon of the compute dtype / 32, or a float) skips vocabulary blocks whose
    softmax-minus-one-hot entries are all below it in the gradient (the loss stays exact).
    ``chunk_bytes`` bounds the torch path's largest temporary.
    """
    options = _LossOptions.build(ignore_index, softcap, reduction, shift, filter_eps, impl, z_loss, chunk_bytes)
    _check_inputs(e, c, targets, bias)
    impl = resolve_impl(options.impl, e)
    rows = select_rows(targets, options.ignore_index, options.shift, c.shape[0])
    e2d = e.reshape(-1, e.shape[-1])
    compute_dtype = matmul_dtype(e, c)
    eps = resolve_filter_eps(options.filter_eps, compute_dtype)
    if impl == "naive":
        loss, lse = _naive_loss(e2d, c, bias, rows, options, compute_dtype)
    else:
        grad_on = torch.is_grad_enabled()
        spec = _CallSpec(
            rows=rows, options=options, compute_dtype=compute_dtype, filter_eps=eps, impl=impl,
            need_de=grad_on and e.requires_grad, need_dc=grad_on and c.requires_grad,
            need_dbias=grad_on and bias is not None and bias.requires_grad,
        )
        # Autocast is decided above (compute_dtype); inside, every cast is explicit.
        with torch.autocast(e.device.type, enabled=False):
            loss, lse = _LinearCrossEntropyFunction.apply(e2d, c, bias, spec)
    return (loss, lse) if return_lse else loss


class LinearCrossEntropy(nn.Module):
    """Module form of ``linear_cross_entropy``: options at construction, ``forward(e, c, targets, bias)``."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        softcap: float | None = None,
        reduction: str = "mean",
        shift: bool | int = 0,
        return_lse: bool = False,
        filter_eps: float | str | None = None,
        impl: str = "auto",
        z_loss: float = 0.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        super().__init__()
        # Validate now, so that a bad value fails when the model is built rather than at the first step.
        _LossOptions.build(ignore_index, softcap, reduction, shift, filter_eps, impl, z_loss, chunk_bytes)
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.reduction = reduction
        self.shift = shift
        self.return_lse = return_lse
        self.filter_eps = filter_eps
        self.impl = impl
        self.z_loss = z_loss
        self.chunk_bytes = chunk_bytes

    def forward(self, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy(
            e, c, targets, bias, ignore_index=self.ignore_index, softcap=self.softcap,
            reduction=self.reduction, shift=self.shift, return_lse=self.return_lse,
            filter_eps=self.filter_eps, impl=self.impl, z_loss=self.z_loss, chunk_bytes=self.chunk_bytes,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, impl={self.impl!r}, ignore_index={self.ignore_index}, "
                f"softcap={self.softcap}, shift={self.shift}, z_loss={self.z_loss}, filter_eps={self.filter_eps!r}")


# ---------------------------------------------------------------------------------------------------
# Options, inputs and the rows that carry a loss


@dataclass(frozen=True)
class _LossOptions:
    ignore_index: int
    softcap: float | None
    reduction: str
    shift: int
    filter_eps: float | str | None
    impl: str
    z_loss: float
    chunk_bytes: int

    @staticmethod
    def build(ignore_index, softcap, reduction, shift, filter_eps, impl, z_loss, chunk_bytes) -> _LossOptions:
        if reduction not in REDUCTIONS:
            raise UserError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
        if impl not in IMPLS:
            raise UserError(f"impl={impl!r}: expected one of {', '.join(IMPLS)}")
        if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
            raise UserError(f"softcap={softcap!r}: expected None or a positive number")
        if not (isinstance(z_loss, (int, float)) and z_loss >= 0 and math.isfinite(z_loss)):
            raise UserError(f"z_loss={z_loss!r}: expected a finite number >= 0")
        if isinstance(shift, bool):
            shift = int(shift)
        if not isinstance(shift, int) or shift < 0:
            raise UserError(f"shift={shift!r}: expected a non-negative integer (or a bool)")
        if not (isinstance(chunk_bytes, int) and chunk_bytes > 0):
            raise UserError(f"chunk_bytes={chunk_bytes!r}: expected a positive integer")
        if not (filter_eps is None or filter_eps == "auto"
                or (isinstance(filter_eps, (int, float)) and not isinstance(filter_eps, bool) and filter_eps > 0)):
            raise UserError(f"filter_eps={filter_eps!r}: expected None, 'auto' or a positive number")
        return _LossOptions(int(ignore_index), None if softcap is None else float(softcap), reduction, shift,
                            filter_eps, impl, float(z_loss), chunk_bytes)


def _check_inputs(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        DTensor = ()
    for name, t in (("e", e), ("c", c), ("targets", targets), ("bias", bias)):
        if isinstance(t, DTensor):
            raise UserError(f"linear_cross_entropy: {name} is a sharded DTensor; call the loss where the output "
                            "head is unsharded (inside the wrapped module's forward)")
    if e.ndim < 2 or c.ndim != 2 or e.shape[-1] != c.shape[1]:
        raise UserError(f"linear_cross_entropy: e {tuple(e.shape)} must be [..., D] and c {tuple(c.shape)} [V, D]")
    if not (e.is_floating_point() and c.is_floating_point()):
        raise UserError(f"linear_cross_entropy: e and c must be floating point, got {e.dtype} and {c.dtype}")
    if targets.shape != e.shape[:-1]:
        raise UserError(f"linear_cross_entropy: targets {tuple(targets.shape)} must match e's leading shape "
                        f"{tuple(e.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise UserError(f"linear_cross_entropy: targets must be integer class indices, got {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (c.shape[0],):
        raise UserError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be [V] = [{c.shape[0]}]")
    if e.device != c.device or targets.device != e.device or (bias is not None and bias.device != e.device):
        raise UserError("linear_cross_entropy: e, c, targets and bias must be on one device")


def resolve_impl(impl: str, e: torch.Tensor) -> str:
    """The implementation that runs: ``auto`` becomes ``triton`` on a capable GPU, else ``torch``."""
    if impl == "auto":
        return "triton" if triton_can_run(e, need_ampere=True) else "torch"
    if impl == "triton" and not triton_can_run(e, need_ampere=False):
        raise UserError(f"impl='triton' needs CUDA tensors and the triton package; got e on {e.device} "
                        f"(triton importable: {_triton_importable()}); use impl='torch' or 'auto'")
    return impl


def triton_can_run(e: torch.Tensor, need_ampere: bool) -> bool:
    """Whether the Triton kernels can run on e's device (checked without importing Triton)."""
    if e.device.type != "cuda" or not torch.cuda.is_available() or not _triton_importable():
        return False
    return not need_ampere or torch.cuda.get_device_capability(e.device) >= (8, 0)


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def matmul_dtype(e: torch.Tensor, c: torch.Tensor) -> torch.dtype:
    """Dtype of the matmuls: autocast's when it is on for the device (as ``Linear``), else the promotion."""
    device = e.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(e.dtype, c.dtype)


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    """The gradient-filter threshold: ``"auto"`` is the dtype's machine epsilon / 32 (bf16: 2**-12)."""
    if filter_eps is None:
        return None
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    return float(filter_eps)


@dataclass(frozen=True)
class RowSelection:
    """Which rows of ``e.reshape(-1, D)`` carry a loss, their targets, and where their losses go.

    ``e_rows`` (None: every row in order) indexes the flattened embeddings; ``out_index`` (None: the
    same) indexes the flattened per-token output of shape ``out_shape`` (``targets[..., shift:]``).
    """

    e_rows: torch.Tensor | None
    out_index: torch.Tensor | None
    targets: torch.Tensor
    out_shape: torch.Size

    @property
    def count(self) -> int:
        return self.targets.numel()

    def scatter_out(self, per_row: torch.Tensor) -> torch.Tensor:
        """Per-row values laid out in ``out_shape`` with zeros at ignored tokens."""
        if self.out_index is None:
            return per_row.reshape(self.out_shape)
        out = per_row.new_zeros(self.out_shape.numel())
        return out.index_copy(0, self.out_index, per_row).reshape(self.out_shape)

    def gather_out(self, per_token: torch.Tensor) -> torch.Tensor:
        """The inverse of ``scatter_out``: the entries of the valid rows, in row order."""
        flat = per_token.reshape(-1)
        return flat if self.out_index is None else flat.index_select(0, self.out_index)


def select_rows(targets: torch.Tensor, ignore_index: int, shift: int, vocab_size: int) -> RowSelection:
    """Drop ignored tokens (and the last ``shift`` positions) before any matmul; check the targets."""
    if shift:
        if targets.ndim == 0 or shift >= targets.shape[-1]:
            raise UserError(f"shift={shift}: must be smaller than the sequence length "
                            f"{targets.shape[-1] if targets.ndim else 0}")
        shifted = targets[..., shift:]
    else:
        shifted = targets
    out_shape = shifted.shape
    flat = shifted.reshape(-1).long()
    valid = flat != ignore_index
    if bool(valid.all()):
        out_index = None
        row_targets = flat
    else:
        out_index = valid.nonzero().squeeze(1)
        row_targets = flat.index_select(0, out_index)
    if row_targets.numel() and (int(row_targets.min()) < 0 or int(row_targets.max()) >= vocab_size):
        bad = row_targets[(row_targets < 0) | (row_targets >= vocab_size)][0].item()
        raise UserError(f"linear_cross_entropy: target {bad} is outside the vocabulary [0, {vocab_size}) and is "
                        f"not ignore_index={ignore_index}")
    if shift:
        # Output position (b, t) of targets[..., shift:] reads embedding row (b, t) of the unshifted e.
        seq, out_seq = targets.shape[-1], out_shape[-1]
        positions = out_index if out_index is not None else torch.arange(flat.numel(), device=flat.device)
        e_rows = positions // out_seq * seq + positions % out_seq
    else:
        e_rows = out_index
    return RowSelection(e_rows, out_index, row_targets.contiguous(), out_shape)


def vocab_order(e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, rows: RowSelection) -> torch.Tensor:
    """Vocabulary sorted by average logit over the valid rows, largest first (the paper's sorting).

    Grouping the likely classes in the first blocks leaves whole blocks of negligible gradient behind
    them for the filter to skip. The average logit is ``c @ mean(e) + bias``: one matrix-vector product.
    """
    weights = torch.zeros(e2d.shape[0], dtype=torch.float32, device=e2d.device)
    if rows.count:
        if rows.e_rows is None:
            weights.fill_(1.0 / rows.count)
        else:
            weights.index_fill_(0, rows.e_rows, 1.0 / rows.count)
    mean_e = torch.mv(e2d.t(), weights.to(e2d.dtype))
    avg = torch.mv(c, mean_e.to(c.dtype)).float()
    if bias is not None:
        avg = avg + bias.float()
    return torch.argsort(avg, descending=True)


def row_scales(lse: torch.Tensor, z_loss: float, loss_grad: torch.Tensor,
               lse_grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row factors of the logit gradient ``g = p * softmax_scale - onehot * target_scale``.

    With per-token loss ``lse - logit[t] + z * lse**2``, upstream gradients ``loss_grad`` (of the loss)
    and ``lse_grad`` (of a returned lse): ``softmax_scale = loss_grad * (1 + 2 z lse) + lse_grad`` and
    ``target_scale = loss_grad``.
    """
    loss_grad = loss_grad.float().expand_as(lse)
    softmax_scale = loss_grad * (1.0 + 2.0 * z_loss * lse) if z_loss else loss_grad.clone()
    if lse_grad is not None:
        softmax_scale = softmax_scale + lse_grad.float()
    return softmax_scale, loss_grad.contiguous()


def chunk_rows(vocab_size: int, compute_dtype: torch.dtype, softcap: float | None, chunk_bytes: int) -> int:
    """Tokens per chunk so that the chunk's logit buffers fit ``chunk_bytes`` (at least one token).

    Per token: the fp32 logits, the fp32 tanh of soft-capping, and a copy in a lower compute dtype.
    """
    per_row = vocab_size * (4 + (4 if softcap is not None else 0)
                            + (torch.finfo(compute_dtype).bits // 8 if compute_dtype != torch.float32 else 0))
    rows = max(1, chunk_bytes // per_row)
    return rows - rows % 16 if rows >= 32 else rows


@dataclass(frozen=True)
class TritonTiles:
    """Tile shape and launch settings of one Triton kernel (planned here, on any machine)."""

    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


def triton_tiles(dtype: torch.dtype, backward: bool) -> TritonTiles:
    """Tiles that keep two or three pipeline stages of the e and c blocks in 96 KiB of shared memory."""
    block_d = 64 if torch.finfo(dtype).bits <= 16 else 32
    if backward:  # holds the logit tile, its gradient and the tanh at once: fewer rows
        return TritonTiles(block_m=64, block_v=128, block_d=block_d, num_warps=8, num_stages=2)
    return TritonTiles(block_m=128, block_v=128, block_d=block_d, num_warps=8, num_stages=3)


def vocab_splits(n_rows: int, vocab: int, tiles: TritonTiles, sm_count: int) -> tuple[int, int]:
    """How the forward splits the vocabulary: (number of splits, columns per split).

    Each program walks a range of the vocabulary for a block of rows; splitting keeps every SM busy
    when there are few row blocks. Ranges are whole tiles, so no tile straddles two splits, and no
    split is empty.
    """
    row_blocks = max(1, -(-n_rows // tiles.block_m))
    vocab_tiles = -(-vocab // tiles.block_v)
    wanted = min(vocab_tiles, max(1, -(-4 * sm_count // row_blocks)))
    per_split = -(-vocab_tiles // wanted) * tiles.block_v
    return -(-vocab // per_split), per_split


# ---------------------------------------------------------------------------------------------------
# The naive reference: full logits


def _naive_loss(e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, rows: RowSelection,
                options: _LossOptions, compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    e_valid = e2d if rows.e_rows is None else e2d.index_select(0, rows.e_rows)
    logits = (e_valid.to(compute_dtype) @ c.to(compute_dtype).t()).float()
    if bias is not None:
        logits = logits + bias.float()
    if options.softcap is not None:
        logits = options.softcap * torch.tanh(logits / options.softcap)
    lse = torch.logsumexp(logits, dim=-1)
    per_row = lse - logits.gather(1, rows.targets[:, None]).squeeze(1)
    if options.z_loss:
        per_row = per_row + options.z_loss * lse.square()
    return _reduce(per_row, rows, options.reduction), rows.scatter_out(lse)


def _reduce(per_row: torch.Tensor, rows: RowSelection, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / rows.count  # nan without valid tokens, as F.cross_entropy
    return rows.scatter_out(per_row)


# ---------------------------------------------------------------------------------------------------
# The chunked torch implementation and the autograd function shared with the Triton kernels


@dataclass(frozen=True)
class _CallSpec:
    rows: RowSelection
    options: _LossOptions
    compute_dtype: torch.dtype
    filter_eps: float | None
    impl: Literal["torch", "triton"]
    need_de: bool
    need_dc: bool
    need_dbias: bool

    @property
    def need_grad(self) -> bool:
        return self.need_de or self.need_dc or self.need_dbias

    @property
    def fused(self) -> bool:
        """Gradients in the forward: torch path, scalar loss, something to differentiate."""
        return self.impl == "torch" and self.options.reduction != "none" and self.need_grad

    def loss_weight(self) -> float:
        """d(loss)/d(per-row loss) of the scalar reductions."""
        return 1.0 / max(self.rows.count, 1) if self.options.reduction == "mean" else 1.0


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, spec: _CallSpec):
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        if spec.impl == "triton":
            from . import cut_ce_triton

            e_mm, c_mm = e2d.to(spec.compute_dtype).contiguous(), c.to(spec.compute_dtype).contiguous()
            lse, target_logit = cut_ce_triton.lse_forward(e_mm, c_mm, bias, spec.rows.e_rows, spec.rows.targets,
                                                          spec.options.softcap)
            grads = None
        else:
            lse, target_logit, grads = _torch_forward(e2d, c, bias, spec)
        per_row = lse - target_logit
        if spec.options.z_loss:
            per_row = per_row + spec.options.z_loss * lse.square()
        loss = _reduce(per_row, spec.rows, spec.options.reduction)
        lse_out = spec.rows.scatter_out(lse)
        ctx.grads = grads
        ctx.save_for_backward(e2d, c, bias, lse)
        return loss, lse_out

    @staticmethod
    @once_differentiable
    def backward(ctx, loss_grad: torch.Tensor | None, lse_out_grad: torch.Tensor | None):
        spec: _CallSpec = ctx.spec
        e2d, c, bias, lse = ctx.saved_tensors
        rows = spec.rows
        lse_grad = None if lse_out_grad is None else rows.gather_out(lse_out_grad)
        if spec.fused:
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy: backward ran twice through a graph whose gradients were "
                                   "computed in the forward; retain_graph is not supported with impl='torch' and a "
                                   "scalar reduction")
            de, dc, dbias = ctx.grads
            ctx.grads = None  # autograd may then take the buffers as .grad without copying them
            if loss_grad is None:
                de = dc = dbias = None
            else:
                for g in (de, dc, dbias):
                    if g is not None:
                        g.mul_(loss_grad.to(g.dtype))
            if lse_grad is not None:
                # A used lse adds softmax * lse_grad to the logit gradient: one recompute pass.
                zero = torch.zeros((), device=lse.device)
                extra = _torch_backward(e2d, c, bias, lse, zero, lse_grad, spec)
                de, dc, dbias = (_add_grads(a, b) for a, b in zip((de, dc, dbias), extra))
            return de, dc, dbias, None
        if loss_grad is None:
            row_loss_grad = torch.zeros((), device=lse.device)
        elif spec.options.reduction == "none":
            row_loss_grad = rows.gather_out(loss_grad)
        else:
            row_loss_grad = loss_grad * spec.loss_weight()
        if spec.impl == "triton":
            de, dc, dbias = _triton_backward(e2d, c, bias, lse, row_loss_grad, lse_grad, spec)
        else:
            de, dc, dbias = _torch_backward(e2d, c, bias, lse, row_loss_grad, lse_grad, spec)
        return de, dc, dbias, None


def _add_grads(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a.add_(b)


def _triton_backward(e2d, c, bias, lse, row_loss_grad, lse_grad, spec: _CallSpec):
    from . import cut_ce_triton

    rows = spec.rows
    softmax_scale, target_scale = row_scales(lse, spec.options.z_loss, row_loss_grad, lse_grad)
    e_mm, c_mm = e2d.to(spec.compute_dtype).contiguous(), c.to(spec.compute_dtype).contiguous()
    order = vocab_order(e_mm, c_mm, bias, rows) if spec.filter_eps is not None else None
    de_rows, dc, dbias = cut_ce_triton.grad_backward(
        e_mm, c_mm, bias, rows.e_rows, rows.targets, lse, softmax_scale, target_scale, order,
        spec.options.softcap, spec.filter_eps, spec.need_de, spec.need_dc, spec.need_dbias)
    de = None
    if spec.need_de:
        de = _scatter_rows(de_rows, rows, e2d)
    return de, None if dc is None else dc.to(c.dtype), None if dbias is None else dbias.to(bias.dtype)


def _scatter_rows(de_rows: torch.Tensor, rows: RowSelection, e2d: torch.Tensor) -> torch.Tensor:
    if rows.e_rows is None:
        return de_rows.to(e2d.dtype)
    de = torch.zeros_like(e2d)
    return de.index_copy_(0, rows.e_rows, de_rows.to(e2d.dtype))


class _Chunker:
    """Walks the valid rows in chunks and owns the reused logit buffers of one pass."""

    def __init__(self, e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, spec: _CallSpec):
        self.spec = spec
        self.rows = spec.rows
        dtype = spec.compute_dtype
        self.e2d = e2d
        self.e_is_dtype = e2d.dtype == dtype
        self.c = c if c.dtype == dtype else c.to(dtype)
        self.bias = None if bias is None else bias.float()
        vocab = c.shape[0]
        budget_rows = chunk_rows(vocab, dtype, spec.options.softcap, spec.options.chunk_bytes)
        self.size = min(budget_rows, max(self.rows.count, 1))
        self.logits = torch.empty(self.size, vocab, dtype=torch.float32, device=e2d.device)
        self.tanh = torch.empty_like(self.logits) if spec.options.softcap is not None else None

    def chunks(self):
        """Yields (start, stop, e rows in the compute dtype, e row index or None, targets)."""
        for start in range(0, self.rows.count, self.size):
            stop = min(start + self.size, self.rows.count)
            if self.rows.e_rows is None:
                index = None
                e_rows = self.e2d[start:stop]
            else:
                index = self.rows.e_rows[start:stop]
                e_rows = self.e2d.index_select(0, index)
            if not self.e_is_dtype:
                e_rows = e_rows.to(self.spec.compute_dtype)
            yield start, stop, e_rows, index, self.rows.targets[start:stop]

    def logits_of(self, e_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 (soft-capped) logits of a chunk in the reused buffer, and the tanh for the cap's gradient."""
        n = e_rows.shape[0]
        out = self.logits[:n]
        if self.c.dtype == torch.float32:
            torch.mm(e_rows, self.c.t(), out=out)
        else:
            out.copy_(torch.mm(e_rows, self.c.t()))
        if self.bias is not None:
            out.add_(self.bias)
        tanh = None
        if self.tanh is not None:
            cap = self.spec.options.softcap
            tanh = torch.div(out, cap, out=self.tanh[:n]).tanh_()
            torch.mul(tanh, cap, out=out)
        return out, tanh


def _torch_forward(e2d, c, bias, spec: _CallSpec):
    """Log-sum-exp and target logit of every valid row; with ``spec.fused`` also dE, dC and dbias."""
    chunker = _Chunker(e2d, c, bias, spec)
    rows = spec.rows
    lse = torch.empty(rows.count, dtype=torch.float32, device=e2d.device)
    target_logit = torch.empty_like(lse)
    fused = spec.fused
    grads = _GradBuffers(e2d, chunker.c, c.dtype, bias, spec) if fused else None
    order = vocab_order(e2d, c, bias, rows) if fused and spec.filter_eps is not None else None
    weight = spec.loss_weight()
    for start, stop, e_rows, index, targets in chunker.chunks():
        logits, tanh = chunker.logits_of(e_rows)
        target_logit[start:stop] = logits.gather(1, targets[:, None]).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        exp = logits.sub_(row_max).exp_()
        sum_exp = exp.sum(dim=1, keepdim=True)
        chunk_lse = (row_max + sum_exp.log()).squeeze(1)
        lse[start:stop] = chunk_lse
        if fused:
            scale = torch.full_like(chunk_lse, weight)
            softmax_scale, target_scale = row_scales(chunk_lse, spec.options.z_loss, scale, None)
            g, kept = _logit_grad_(exp, sum_exp.reciprocal_().squeeze(1), targets, softmax_scale, target_scale,
                                   tanh, spec.filter_eps, order)
            grads.add_chunk(g, kept, e_rows, start, stop, index)
    return lse, target_logit, None if grads is None else grads.result()


def _torch_backward(e2d, c, bias, lse, row_loss_grad, lse_grad, spec: _CallSpec):
    """dE, dC, dbias by recomputing each chunk's logits from the saved log-sum-exp."""
    chunker = _Chunker(e2d, c, bias, spec)
    grads = _GradBuffers(e2d, chunker.c, c.dtype, bias, spec)
    order = vocab_order(e2d, c, bias, spec.rows) if spec.filter_eps is not None else None
    softmax_scale, target_scale = row_scales(lse, spec.options.z_loss, row_loss_grad, lse_grad)
    ones = torch.ones(chunker.size, dtype=torch.float32, device=lse.device)
    for start, stop, e_rows, index, targets in chunker.chunks():
        logits, tanh = chunker.logits_of(e_rows)
        probs = logits.sub_(lse[start:stop, None]).exp_()
        g, kept = _logit_grad_(probs, ones[: stop - start], targets, softmax_scale[start:stop],
                               target_scale[start:stop], tanh, spec.filter_eps, order)
        grads.add_chunk(g, kept, e_rows, start, stop, index)
    return grads.result()


def _logit_grad_(exp: torch.Tensor, prob_scale: torch.Tensor, targets: torch.Tensor, softmax_scale: torch.Tensor,
                 target_scale: torch.Tensor, tanh: torch.Tensor | None, filter_eps: float | None,
                 order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn ``exp`` (softmax times ``1/prob_scale`` per row) into the logit gradient, in place.

    ``g = softmax * softmax_scale - onehot * target_scale``, times ``1 - tanh**2`` under soft-capping.
    With ``filter_eps`` also returns the vocabulary columns whose blocks are kept (None: all of them).
    """
    tgt = targets[:, None]
    kept = None
    if filter_eps is None:
        exp.mul_((prob_scale * softmax_scale)[:, None])
        exp.scatter_add_(1, tgt, -target_scale[:, None])
    else:
        exp.mul_(prob_scale[:, None])
        exp.scatter_add_(1, tgt, torch.full_like(target_scale[:, None], -1.0))  # softmax - onehot
        kept = _kept_columns(exp, order, filter_eps)
        exp.mul_(softmax_scale[:, None])
        exp.scatter_add_(1, tgt, (softmax_scale - target_scale)[:, None])
    if tanh is not None:
        exp.mul_(tanh.square_().neg_().add_(1.0))
    return exp, kept


def _kept_columns(diff: torch.Tensor, order: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Columns of the vocabulary blocks (in ``order``) holding an entry with ``|softmax - onehot| >= eps``.

    None when so much is kept that dense matmuls are cheaper than gathering.
    """
    col_max = torch.maximum(diff.amax(dim=0), diff.amin(dim=0).neg_())
    vocab = order.numel()
    blocks = -(-vocab // FILTER_BLOCK_V)
    sorted_max = torch.zeros(blocks * FILTER_BLOCK_V, dtype=col_max.dtype, device=col_max.device)
    sorted_max[:vocab] = col_max[order]
    keep_block = sorted_max.view(blocks, FILTER_BLOCK_V).amax(dim=1) >= eps
    n_kept = int(keep_block.sum())
    if n_kept > DENSE_ABOVE_KEPT * blocks:
        return None
    padded = torch.full((blocks * FILTER_BLOCK_V,), -1, dtype=order.dtype, device=order.device)
    padded[:vocab] = order
    cols = padded.view(blocks, FILTER_BLOCK_V)[keep_block].reshape(-1)
    return cols[cols >= 0]


class _GradBuffers:
    """dE, dC (fp32 accumulator) and dbias of the torch path, filled chunk by chunk.

    ``c_mm`` is the classifier in the compute dtype; gradients come back in the dtypes of ``e2d``,
    ``c_dtype`` and ``bias``.
    """

    def __init__(self, e2d: torch.Tensor, c_mm: torch.Tensor, c_dtype: torch.dtype, bias: torch.Tensor | None,
                 spec: _CallSpec):
        self.c = c_mm
        self.c_dtype = c_dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.de = torch.zeros_like(e2d) if spec.need_de else None
        self.dc = torch.zeros(c_mm.shape, dtype=torch.float32, device=c_mm.device) if spec.need_dc else None
        self.dbias = torch.zeros(c_mm.shape[0], dtype=torch.float32, device=c_mm.device) if spec.need_dbias else None
        # Vocabulary rows per partial product when dC cannot accumulate in place (gathered columns or
        # lower-precision matmuls): the partial product and its fp32 copy stay within half the budget.
        width = c_mm.shape[1] * (4 + c_mm.element_size())
        self.vocab_slice = max(FILTER_BLOCK_V, spec.options.chunk_bytes // (2 * width))

    def add_chunk(self, g: torch.Tensor, kept: torch.Tensor | None, e_rows: torch.Tensor, start: int, stop: int,
                  index: torch.Tensor | None) -> None:
        """Add one chunk's contribution: its rows of dE, and its share of dC and dbias."""
        if self.dbias is not None:
            self.dbias.add_(g.sum(dim=0))
        if self.de is None and self.dc is None:
            return
        gm = g if g.dtype == self.c.dtype else g.to(self.c.dtype)
        if kept is None:
            if self.de is not None:
                self._de_rows_dense(gm, start, stop, index)
            if self.dc is not None:
                self._add_dc(gm.t(), e_rows, None)
            return
        de_rows = None
        if self.de is not None:
            de_rows = torch.zeros(g.shape[0], self.c.shape[1], dtype=torch.float32, device=g.device)
        for cols in kept.split(self.vocab_slice):
            g_kept = gm.index_select(1, cols)
            if de_rows is not None:
                de_rows.add_(torch.mm(g_kept, self.c.index_select(0, cols)))
            if self.dc is not None:
                self._add_dc(g_kept.t(), e_rows, cols)
        if de_rows is not None:
            self._store_de(de_rows, start, stop, index)

    def _de_rows_dense(self, gm: torch.Tensor, start: int, stop: int, index: torch.Tensor | None) -> None:
        if index is None and self.de.dtype == gm.dtype:
            torch.mm(gm, self.c, out=self.de[start:stop])  # straight into dE, no temporary
        else:
            self._store_de(torch.mm(gm, self.c), start, stop, index)

    def _store_de(self, de_rows: torch.Tensor, start: int, stop: int, index: torch.Tensor | None) -> None:
        if index is None:
            self.de[start:stop] = de_rows
        else:
            self.de.index_copy_(0, index, de_rows.to(self.de.dtype))

    def _add_dc(self, g_t: torch.Tensor, e_rows: torch.Tensor, cols: torch.Tensor | None) -> None:
        if cols is None and g_t.dtype == torch.float32:
            self.dc.addmm_(g_t, e_rows)  # BLAS accumulates in place: no [V, D] temporary
            return
        for lo in range(0, g_t.shape[0], self.vocab_slice):
            part = torch.mm(g_t[lo:lo + self.vocab_slice], e_rows)
            if cols is None:
                self.dc[lo:lo + part.shape[0]].add_(part)
            else:
                self.dc.index_add_(0, cols[lo:lo + part.shape[0]], part.float())

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        dc = self.dc if self.dc is None or self.c_dtype == torch.float32 else self.dc.to(self.c_dtype)
        dbias = self.dbias if self.dbias is None else self.dbias.to(self.bias_dtype)
        return self.de, dc, dbias
