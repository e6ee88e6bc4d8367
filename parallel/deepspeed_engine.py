"""DeepSpeed ZeRO (stage 1, 2 or 3) driving leantrain's optimizer, LR schedule and loop.

leantrain builds the optimizer and passes it to ``deepspeed.initialize``; DeepSpeed wraps it in its
ZeRO optimizer, which keeps the flat fp32 partitions and steps our optimizer on them. No scheduler
goes to DeepSpeed: our LambdaLR stays on our optimizer, whose param groups ZeRO keeps (it only
swaps their ``params`` for the flat partitions), so the schedule drives the real update. Batch
sizes, accumulation and clipping come from the ``trainer`` section; ``parallel.deepspeed`` holds the
rest (ZeRO stage, offload_optimizer, bucket sizes, ...). The loop marks accumulation windows with
``set_gradient_accumulation_boundary`` and calls ``step()`` once per optimizer step.

ZeRO flattens parameters into 1-D partitions, so optimizers that need the 2-D weight matrices
(GaLore, Natural GaLore, FRUGAL, LISA) and per-layer updates cannot run under it: they are
refused with the backend that runs them.

Checkpoints: under stage 1 and 2 every rank holds the whole model, saved once; the ZeRO optimizer's
state (fp32 partitions and our optimizer's state on them) is saved per rank. Under stage 3 the
per-rank optimizer state alone restores the model, whose partitions are copied from the fp32 ones.
"""

import enum
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import UserError
from .config import ParallelConfig
from .world import World, ensure_process_group
from .wrap import DataParallelEngine

ZERO_STAGES = (1, 2, 3)
DEFAULT_CONFIG: dict[str, Any] = {"zero_optimization": {"stage": 2}}
# What our optimizer must be for ZeRO's flat 1-D partitions: an element-wise update.
FLAT_OPTIMIZERS = ("AdamW", "Adam", "SGD")
# Keys leantrain sets from its own config, each with the setting that owns it.
OWNED_KEYS = {"train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
              "gradient_accumulation_steps": "trainer.global_batch_size",
              "train_batch_size": "trainer.global_batch_size",
              "gradient_clipping": "trainer.grad_clip", "optimizer": "the optim section",
              "scheduler": "the optim section (optim.schedule)"}
# Modules whose submodules return structures (MoE routing) that hide tensors from ZeRO-3's backward hooks:
# their parameters are gathered for the whole module instead.
Z3_LEAF_MODULES = ("MoELayer",)
_LOSS_SCALER = "loss_scaler"
_STRUCTURAL = ("param_slice_mappings",)  # rebuilt from the model at start; not plain data


def load_deepspeed_config(value: Any) -> dict[str, Any]:
    """``parallel.deepspeed`` as a dict: an inline mapping, a JSON file's content, or the default."""
    if value is None or value == "" or value == {}:
        return json.loads(json.dumps(DEFAULT_CONFIG))
    if isinstance(value, dict):
        return json.loads(json.dumps(value))
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"parallel.deepspeed={value!r}: no such file (give a JSON file or an inline mapping)")
        try:
            loaded = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"parallel.deepspeed: cannot read {path} as JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"parallel.deepspeed: {path} must hold a JSON object")
        return loaded
    raise UserError(f"parallel.deepspeed must be a mapping or the path of a JSON file, got {value!r}")


def complete_config(ds_config: dict[str, Any], *, micro_batch_size: int, accumulation_steps: int, world_size: int,
                    grad_clip: float) -> dict[str, Any]:
    """Check the user's DeepSpeed config and add what leantrain owns (batch sizes, clipping)."""
    for key, owner in OWNED_KEYS.items():
        if key in ds_config:
            raise UserError(f"parallel.deepspeed.{key}: leantrain sets it from {owner}; remove it from the "
                            f"DeepSpeed config")
    zero = ds_config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError("parallel.deepspeed.zero_optimization must be a mapping")
    stage = zero.setdefault("stage", DEFAULT_CONFIG["zero_optimization"]["stage"])
    if stage not in ZERO_STAGES:
        raise UserError(f"parallel.deepspeed.zero_optimization.stage={stage!r}; choose 1, 2 or 3 "
                        f"(without ZeRO use parallel.backend=ddp)")
    return {**ds_config, "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": accumulation_steps,
            "train_batch_size": micro_batch_size * accumulation_steps * world_size,
            "gradient_clipping": max(grad_clip, 0.0), "zero_allow_untested_optimizer": True,
            "steps_per_print": ds_config.get("steps_per_print", 2**31 - 1)}


def check_flat_optimizer(optimizer: Optimizer) -> None:
    """Refuse optimizers that cannot step ZeRO's flat 1-D partitions, naming what runs them."""
    name = type(optimizer).__name__
    if name == "OffloadOptimizer":
        raise UserError("optim.offload cannot wrap the optimizer under parallel.backend=deepspeed: use DeepSpeed's "
                        "own, parallel.deepspeed.zero_optimization.offload_optimizer: {device: cpu}")
    if name in FLAT_OPTIMIZERS and type(optimizer).__module__.startswith("torch.optim"):
        return
    raise UserError(f"parallel.backend=deepspeed cannot run {name}: ZeRO flattens the weights into 1-D partitions, "
                    f"and {name} needs each 2-D weight matrix (or steps inside backward). Use "
                    f"parallel.backend=fsdp2, which keeps the matrices' rows sharded, or parallel.backend=ddp; "
                    f"or optim.name=adamw with DeepSpeed")


def build_deepspeed_engine(loss_module: nn.Module, model: nn.Module, cfg: ParallelConfig, world: World,
                           make_optimizer: Callable[[], Optimizer], *, grad_clip: float, micro_batch_size: int,
                           accumulation_steps: int) -> "DeepSpeedEngine":
    ds_config = complete_config(load_deepspeed_config(cfg.deepspeed), micro_batch_size=micro_batch_size,
                                accumulation_steps=accumulation_steps, world_size=world.world_size,
                                grad_clip=grad_clip)
    optimizer = make_optimizer()
    check_flat_optimizer(optimizer)
    ensure_process_group(world)
    for key, value in (("RANK", world.rank), ("LOCAL_RANK", world.local_rank), ("WORLD_SIZE", world.world_size)):
        os.environ.setdefault(key, str(value))  # DeepSpeed reads them even when the group exists
    import deepspeed  # heavy, and only needed here

    if ds_config["zero_optimization"]["stage"] == 3:
        leaves = {type(m) for m in loss_module.modules() if type(m).__name__ in Z3_LEAF_MODULES}
        if leaves:
            deepspeed.utils.set_z3_leaf_modules(loss_module, list(leaves))
    ds_engine, *_ = deepspeed.initialize(model=loss_module, optimizer=optimizer, config=ds_config,
                                         dist_init_required=False)
    return DeepSpeedEngine(ds_engine, model, optimizer, ds_config["zero_optimization"]["stage"])


class DeepSpeedEngine(DataParallelEngine):
    """The loop's view of a DeepSpeed engine: its forward, backward, step and ZeRO state."""

    def __init__(self, ds_engine: Any, model: nn.Module, optimizer: Optimizer, stage: int):
        super().__init__(ds_engine, model, optimizer, grad_clip=0.0)
        self.stage = stage

    def micro_step(self, is_last: bool) -> AbstractContextManager:
        self.module.set_gradient_accumulation_boundary(is_last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already scales the loss for accumulation.
        self.module.backward(loss, scale_wrt_gas=False)

    def step(self) -> torch.Tensor:
        """DeepSpeed clips (``gradient_clipping``) and steps; returns its global norm before clipping."""
        self.module.step()
        norm = self.module.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()

    def zero_grad(self) -> None:
        self.module.zero_grad()

    def checkpoint_states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        per_rank = {"optimizer": ZeroOptimizerState(self.module)}
        if self.stage == 3:  # the model's partitions are restored from the optimizer's fp32 ones
            return {}, per_rank
        return {"model": self.model}, per_rank

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.stage != 3:
            return self.model.state_dict()
        gathered = self.module._zero3_consolidated_16bit_state_dict() or {}  # a collective; rank 0 gets it all
        prefix = _submodule_prefix(self.module.module, self.model)
        return {name[len(prefix):]: value for name, value in gathered.items() if name.startswith(prefix)}


def _submodule_prefix(root: nn.Module, child: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is child:
            return f"{name}." if name else ""
    raise ValueError("the model is not a submodule of the DeepSpeed engine's module")


class ZeroOptimizerState:
    """This rank's ZeRO optimizer state as plain tensors and values (what weights-only loading accepts)."""

    def __init__(self, ds_engine: Any):
        self.ds_engine = ds_engine

    @property
    def zero(self) -> Any:
        return self.ds_engine.optimizer

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.zero.state_dict())
        scaler = state.pop(_LOSS_SCALER)
        for key in _STRUCTURAL:
            state.pop(key, None)
        state[_LOSS_SCALER] = {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool, str))}
        return _plain(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        scaler = self.zero.loss_scaler
        for key, value in state.pop(_LOSS_SCALER).items():
            setattr(scaler, key, value)
        state[_LOSS_SCALER] = scaler
        current = self.zero.state_dict()
        for key in _STRUCTURAL:
            if key in current:
                state[key] = current[key]
        prologue = getattr(self.zero, "checkpoint_event_prologue", None)
        if prologue is not None:
            prologue()
        world_size = torch.distributed.get_world_size(self.ds_engine.data_parallel_group)
        # ZeRO takes every rank's state and picks its own; ours are not shared, so each rank passes its own.
        self.zero.load_state_dict([state] * world_size, load_optimizer_states=True, load_from_fp32_weights=True)
        epilogue = getattr(self.zero, "checkpoint_event_epilogue", None)
        if epilogue is not None:
            epilogue()


def _plain(tree: Any) -> Any:
    """Containers as dicts and lists, enums as their values, tensors detached."""
    if isinstance(tree, enum.Enum):
        return tree.value
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {key: _plain(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(value) for value in tree]
    if tree is None or isinstance(tree, (int, float, bool, str)):
        return tree
    raise TypeError(f"ZeRO optimizer state holds a {type(tree).__name__}, which a checkpoint cannot store")
