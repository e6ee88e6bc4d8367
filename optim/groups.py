"""Which parameters get weight decay, and which a low-rank optimizer projects.

Biases and norm gains (every tensor with fewer than two dimensions) get no weight decay; matrices
(linear weights, embeddings, the output head) do. Low-rank optimizers add their own split of the
matrices into projected and dense groups on top of this.
"""

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import UserError


def decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (ndim >= 2) and an undecayed one."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def count_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (exact, from the tensors themselves).

    Tensors inside state objects (peer libraries' projectors) count too, each tensor once; a sharded
    ``DTensor`` counts its local shard, so the figure is this rank's memory.
    """
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            for tensor in _tensors_in(value):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor: this shard
                    total += local.numel() * local.element_size()
    return total


def _tensors_in(value: Any, depth: int = 3) -> list[torch.Tensor]:
    """The tensors in a state value: itself, or inside containers and plain objects (a few levels deep)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0:
        return []
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v, depth - 1)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v, depth - 1)]
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return [t for v in vars(value).values() for t in _tensors_in(v, depth - 1)]
    return []


def low_rank_groups(model: nn.Module, target_modules: Iterable[str], weight_decay: float,
                    projection: dict[str, Any]) -> list[dict]:
    """A projected group (``projection`` holds rank etc.) plus ``decay_groups`` for the rest.

    Projected: the 2-D weight of every ``nn.Linear`` whose module name matches one of the
    ``target_modules`` regular expressions (``re.search``). Embeddings, norms, biases and the output
    head stay dense; they get plain AdamW in the same optimizer.
    """
    target_modules = list(target_modules)
    patterns = []
    for pattern in target_modules:
        try:
            patterns.append(re.compile(pattern))
        except re.error as exc:
            raise UserError(f"optim.target_modules: {pattern!r} is not a regular expression ({exc})") from None
    projected: list[nn.Parameter] = []
    projected_ids: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) and weight is not None and weight.requires_grad and weight.ndim == 2
                and id(weight) not in projected_ids and any(p.search(name) for p in patterns)):
            projected.append(weight)
            projected_ids.add(id(weight))
    if not projected:
        raise UserError(f"optim.target_modules={target_modules} matched no nn.Linear module of the model; "
                        f"give regexes that match names such as 'layers.0.attention.wq'")
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in projected_ids]
    group = {"params": projected, "weight_decay": weight_decay, **projection}
    return [group, *decay_groups(rest, weight_decay)]


def zero_step(optimizer: torch.optim.Optimizer) -> None:
    """One ``step()`` on zero gradients at learning rate 0: the state takes its shape, the weights stay.

    What ``torch.distributed.checkpoint``'s ``get_state_dict`` does to a fresh optimizer to learn the
    keys of its state; optimizers whose state depends on the step (LISA, FRUGAL) call it after setting
    their counters (``prepare_load``).
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        for p in params:
            p.grad = None
