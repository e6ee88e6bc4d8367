"""The root config: one structured omegaconf schema composed of each package's dataclass.

A run's config is a YAML file (a path, or the name of a bundled config in ``leantrain/configs``)
plus ``key=value`` overrides. Unknown keys, wrong types and invalid choices raise ``UserError``
naming the full key and where it came from (the file, or the command line).
"""

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..checkpoint.config import EC_LIBRARIES, MODES, CheckpointConfig
from ..errors import UserError
from ..moe.config import MoEConfig
from ..nn.config import ModelConfig
from ..nn.loss import LOSS_IMPLS, LossConfig
from ..nn.model import PARAM_DTYPES, PRESETS
from ..optim.build import OPTIMIZERS
from ..optim.config import OptimConfig
from ..optim.frugal import BLOCK_ORDERS, SELECTIONS, STATE_FREE_RULES
from ..optim.offload import OFFLOAD_MODES
from ..optim.quantize import STATE_BITS
from ..parallel.config import ParallelConfig
from ..parallel.wrap import BACKENDS
from .data import SOURCES, DataConfig
from .metrics import WANDB_MODES, LoggingConfig
from .schedule import SCHEDULES


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps of the whole run (the LR schedule's length)."""
    stop_at_step: int = 0
    """Stop this invocation after this step (a checkpoint is saved); 0 runs to max_steps."""
    run_dir: str = "runs/default"
    """Directory of the run: config.yaml, metrics.jsonl, checkpoints/, final/."""
    seed: int = 0
    """Seed of the weights' initialisation and the data order."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all ranks and accumulation steps."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on one rank."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    eval_interval: int = 50
    """Evaluate validation loss every this many steps (and at the first and last); 0 disables."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation, per rank."""
    dtype: str = "bf16"
    """Autocast dtype of forward and backward: bf16 | fp32 (the weights stay in model.param_dtype)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    memory_check: bool = True
    """Before building the model, refuse a run whose memory plan (leantrain estimate) exceeds the device's free memory."""
    max_bad_steps: int = 5
    """Stop the run after this many optimizer steps in a row with a non-finite gradient norm (each is skipped)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.preset": tuple(PRESETS),
    "model.norm": ("pre", "post", "peri"),
    "model.param_dtype": PARAM_DTYPES,
    "data.source": SOURCES,
    "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
    "optim.offload": OFFLOAD_MODES,
    "optim.frugal.selection": SELECTIONS,
    "optim.frugal.block_order": BLOCK_ORDERS,
    "optim.frugal.state_free": STATE_FREE_RULES,
    "parallel.param_dtype": ("fp32", "bf16"),
    "parallel.reduce_dtype": ("fp32", "bf16"),
    "loss.impl": LOSS_IMPLS,
    "parallel.backend": BACKENDS,
    "logging.wandb.mode": WANDB_MODES,
    "checkpoint.mode": MODES,
    "checkpoint.ec.library": EC_LIBRARIES,
    "trainer.dtype": ("bf16", "fp32"),
    "trainer.device": ("auto", "cpu", "cuda"),
}
POSITIVE = ("trainer.max_steps", "trainer.global_batch_size", "trainer.micro_batch_size",
            "trainer.eval_batches", "trainer.max_bad_steps", "data.seq_len", "logging.log_interval", "checkpoint.keep")
NON_NEGATIVE = ("trainer.stop_at_step", "trainer.eval_interval", "trainer.grad_clip", "checkpoint.interval",
                "optim.warmup_steps", "optim.weight_decay", "moe.num_experts")

# Keys that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.stop_at_step", "trainer.run_dir", "trainer.eval_interval",
                     "trainer.eval_batches", "trainer.micro_batch_size", "trainer.device", "trainer.memory_check",
                     "trainer.max_bad_steps", "checkpoint", "logging", "data.cache_dir")


def bundled_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("leantrain.configs").iterdir() if p.name.endswith(".yaml"))


def find_config_file(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled config (``quickstart``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = resources.files("leantrain.configs") / f"{name_or_path}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    raise UserError(f"config {name_or_path!r} not found: it is neither a file nor a bundled config "
                    f"({', '.join(bundled_configs())})")


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = e.full_key or "(top level)"
        detail = (e.msg or str(e)).splitlines()[0]
        kind = "unknown key" if "not in" in detail else "invalid value for"
        raise UserError(f"{source}: {kind} '{key}': {detail}") from None


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def validate(cfg: DictConfig, source: str) -> None:
    """Check choices and ranges; ``source`` names where the values came from."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise UserError(f"{source}: invalid choice for '{key}': {value!r} (choose one of {', '.join(allowed)})")
    state_bits = _get(cfg, "optim.state_bits")
    if state_bits not in STATE_BITS:  # an int, so not in CHOICES (whose values are names)
        raise UserError(f"{source}: invalid choice for 'optim.state_bits': {state_bits!r} "
                        f"(choose one of {', '.join(map(str, STATE_BITS))})")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise UserError(f"{source}: '{key}' must be positive, got {_get(cfg, key)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise UserError(f"{source}: '{key}' must not be negative, got {_get(cfg, key)}")
    if _get(cfg, "optim.layerwise") and _get(cfg, "trainer.grad_clip") > 0:
        raise UserError(f"{source}: 'trainer.grad_clip' ({_get(cfg, 'trainer.grad_clip')}) cannot combine with "
                        "'optim.layerwise': each parameter steps inside backward, before the global norm exists. "
                        "Set trainer.grad_clip=0 and optim.layerwise_clip to clip each parameter instead")


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Schema defaults, then the YAML file, then ``key=value`` overrides, each checked as it comes."""
    path = find_config_file(name_or_path)
    schema = OmegaConf.structured(Config)
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OSError) as e:
        raise UserError(f"{path}: cannot read the config: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path}: a config must be a mapping of sections (model, data, optim, ...)")
    cfg = _merge(schema, loaded, str(path))
    validate(cfg, str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise UserError(f"command line: overrides are key=value, got {bad[0]!r}")
        try:
            dotlist = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as e:
            raise UserError(f"command line: cannot parse overrides: {str(e).splitlines()[0]}") from None
        cfg = _merge(cfg, dotlist, "command line")
        validate(cfg, "command line")
    return OmegaConf.to_object(cfg)


def accumulation_steps(cfg: TrainerConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank: global / (micro x world)."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise UserError(f"trainer.global_batch_size ({cfg.global_batch_size}) must be a multiple of "
                        f"trainer.micro_batch_size x world size ({cfg.micro_batch_size} x {world_size} = {per_step})")
    return cfg.global_batch_size // per_step


def to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The flattened settings that make a run what it is (what a resumed run must share)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif not any(prefix == key or prefix.startswith(key + ".") for key in RESUMABLE_CHANGES):
            flat[prefix] = value

    walk("", to_dict(cfg))
    return flat
