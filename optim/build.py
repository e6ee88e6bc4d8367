"""Turn the ``optim`` config section into an optimizer over a model's parameters."""

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from .adamw import AdamW
from .config import OptimConfig
from .galore import SWITCH_POLICIES, GaLoreAdamW, check_stagger, stagger_offsets
from .groups import decay_groups, low_rank_groups
from .frugal import FRUGAL
from .layerwise import LayerwiseOptimizer
from .lisa import LISA
from .moments import check_state_bits
from .natural_galore import NaturalGaLoreAdamW
from .offload import OffloadOptimizer
from .projector import PROJ_TYPES, SVD_METHODS

OPTIMIZERS = ("adamw", "galore", "natural_galore", "apollo", "frugal", "lisa")
FREEZING_OPTIMIZERS = ("lisa",)
"""Optimizers that switch parameters' ``requires_grad`` during training (DDP must look for unused ones)."""
APOLLO_MISSING = ("optim.name=apollo needs the apollo-torch package (a peer library, not a runtime dependency): "
                  "pip install apollo-torch, or pip install 'leantrain[dev]'")


def build_optimizer(cfg: OptimConfig, model: nn.Module, seed: int = 0) -> torch.optim.Optimizer:
    """Build the optimizer named by ``optim.name`` for ``model``'s trainable parameters.

    With ``optim.layerwise`` this returns a ``LayerwiseOptimizer``; pass the DDP-wrapped module (or
    call its ``attach_ddp``) so that parameters step on the allreduced gradient. Under FSDP2 build it
    on the sharded model; ``parallel.fsdp`` swaps its inner optimizers for their sharded forms.
    """
    if cfg.lr <= 0:
        raise UserError(f"optim.lr must be positive, got {cfg.lr}")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise UserError(f"optim.betas must be two numbers in [0, 1), got {list(cfg.betas)}")
    if cfg.layerwise_clip < 0:
        raise UserError(f"optim.layerwise_clip must be >= 0 (0 disables it), got {cfg.layerwise_clip}")
    state_bits = check_state_bits(cfg.state_bits, "optim.state_bits")
    if cfg.name == "adamw":
        groups = decay_groups(model.named_parameters(), cfg.weight_decay)
        if state_bits == 32 and all(p.dtype == torch.float32 for g in groups for p in g["params"]):
            # fused AdamW runs on CPU and CUDA and is the fastest torch path on both.
            optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW
            kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
        else:  # 8-bit moments, or bf16 weights rounded stochastically
            optimizer_class = AdamW
            kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, state_bits=state_bits, seed=seed)
    elif cfg.name in ("galore", "natural_galore"):
        groups, optimizer_class, kwargs = _low_rank_setup(cfg, model)
        kwargs.update(state_bits=state_bits, seed=seed)
    elif cfg.name == "apollo":
        if state_bits != 32:
            raise UserError("optim.state_bits=8 is not available with optim.name=apollo: apollo-torch keeps its own "
                            "float32 state; use optim.state_bits=32, or galore / adamw for 8-bit moments")
        groups, optimizer_class, kwargs = _apollo_setup(cfg, model)
    elif cfg.name == "frugal":
        groups = low_rank_groups(model, cfg.target_modules, cfg.weight_decay, {"projectable": True})
        optimizer_class = FRUGAL
        f = cfg.frugal
        kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, density=f.density, update_gap=f.update_gap,
                      selection=f.selection, block_order=f.block_order, state_free=f.state_free,
                      reset_statistics=f.reset_statistics, inactive_lr_scale=f.inactive_lr_scale,
                      state_full_lr_scale=f.state_full_lr_scale, state_bits=state_bits, seed=seed)
    elif cfg.name == "lisa":
        if cfg.layerwise or cfg.offload != "none":
            raise UserError("optim.name=lisa manages its own active layers; set optim.layerwise=false and optim.offload=none")
        if cfg.lisa.base != "adamw":
            raise UserError(f"optim.lisa.base: {cfg.lisa.base!r} is not supported; use adamw")
        return LISA(model, n_layers=cfg.lisa.n_layers, interval=cfg.lisa.interval, seed=seed,
                    layers_attr=cfg.lisa.layers_attr or None, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                    weight_decay=cfg.weight_decay, state_bits=state_bits)
    else:
        raise UserError(f"optim.name: unknown optimizer {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.offload != "none":
        if cfg.layerwise:
            raise UserError("optim.offload and optim.layerwise cannot be combined: offload steps whole subgroups "
                            "after backward; choose one")
        if cfg.stagger is not False and cfg.name != "adamw":
            groups = _split_for_stagger(groups, cfg.stagger)
            kwargs.pop("stagger")
        return OffloadOptimizer(groups, optimizer_class, mode=cfg.offload, subgroup_numel=cfg.offload_subgroup_size,
                                cpu_threads=cfg.offload_cpu_threads, **kwargs)
    if not cfg.layerwise:
        return optimizer_class(groups, **kwargs)
    if cfg.stagger is not False and cfg.name != "adamw":
        groups = _split_for_stagger(groups, cfg.stagger)
        kwargs.pop("stagger")
    optimizer = LayerwiseOptimizer(groups, optimizer_class, clip_norm=cfg.layerwise_clip, **kwargs)
    if isinstance(model, DistributedDataParallel):
        optimizer.attach_ddp(model)
    return optimizer


def _low_rank_setup(cfg: OptimConfig, model: nn.Module) -> tuple[list[dict], type[torch.optim.Optimizer], dict]:
    for key, value in (("rank", cfg.rank), ("update_proj_gap", cfg.update_proj_gap)):
        if not (isinstance(value, int) and value >= 1):
            raise UserError(f"optim.{key} must be a positive integer, got {value!r}")
    if cfg.scale <= 0:
        raise UserError(f"optim.scale must be positive, got {cfg.scale}")
    for key, value, choices in (("proj_type", cfg.proj_type, PROJ_TYPES), ("svd", cfg.svd, SVD_METHODS),
                                ("switch", cfg.switch, SWITCH_POLICIES)):
        if value not in choices:
            raise UserError(f"optim.{key}={value!r}; choose one of {', '.join(choices)}")
    stagger = check_stagger(cfg.stagger, "optim.stagger")
    projection = dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale, proj_type=cfg.proj_type)
    groups = low_rank_groups(model, cfg.target_modules, cfg.weight_decay, projection)
    # torch-order decoupled decay (decay, then update), as the adamw path does.
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, svd=cfg.svd, switch=cfg.switch,
                                  stagger=stagger, decay_before_update=True)
    if cfg.name == "galore":
        return groups, GaLoreAdamW, kwargs
    if cfg.history < 0:
        raise UserError(f"optim.history must be >= 0 (0 picks it per matrix), got {cfg.history}")
    if cfg.damping <= 0:
        raise UserError(f"optim.damping must be positive, got {cfg.damping}")
    return groups, NaturalGaLoreAdamW, {**kwargs, "history": cfg.history, "damping": cfg.damping}


def _apollo_setup(cfg: OptimConfig, model: nn.Module) -> tuple[list[dict], type[torch.optim.Optimizer], dict]:
    """APOLLO from apollo-torch (imported only here): GaLore's param groups plus its projection and scaling."""
    try:
        from .apollo import APOLLO, PROJ_TYPES as APOLLO_PROJ_TYPES, PROJECTIONS, SCALE_TYPES
    except ImportError:
        raise UserError(APOLLO_MISSING) from None
    if cfg.layerwise or cfg.offload != "none":
        raise UserError("optim.name=apollo runs as one optimizer after backward; set optim.layerwise=false and "
                        "optim.offload=none")
    for key, value in (("rank", cfg.rank), ("update_proj_gap", cfg.update_proj_gap)):
        if not (isinstance(value, int) and value >= 1):
            raise UserError(f"optim.{key} must be a positive integer, got {value!r}")
    a = cfg.apollo
    if a.scale <= 0:
        raise UserError(f"optim.apollo.scale must be positive, got {a.scale}")
    for key, value, choices in (("proj_type", cfg.proj_type, APOLLO_PROJ_TYPES),
                                ("apollo.proj", a.proj, PROJECTIONS), ("apollo.scale_type", a.scale_type, SCALE_TYPES)):
        if value not in choices:
            raise UserError(f"optim.{key}={value!r} with optim.name=apollo; choose one of {', '.join(choices)}")
    projection = dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=a.scale, proj_type=cfg.proj_type,
                      proj=a.proj, scale_type=a.scale_type)
    groups = low_rank_groups(model, cfg.target_modules, cfg.weight_decay, projection)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, scale_front=a.scale_front,
                  disable_nl=not a.norm_growth_limiter)
    return groups, APOLLO, kwargs


def _split_for_stagger(groups: list[dict], stagger: bool | int) -> list[dict]:
    """One group per projected matrix, carrying its refresh phase: per-layer optimizers see one matrix each."""
    projected = [(p, g) for g in groups if "rank" in g for p in g["params"]]
    offsets = stagger_offsets([g["update_proj_gap"] for _, g in projected], stagger)
    split = [{**g, "params": [p], "refresh_offset": offset} for (p, g), offset in zip(projected, offsets)]
    return split + [g for g in groups if "rank" not in g]
