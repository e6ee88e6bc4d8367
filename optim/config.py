"""Configuration of the optimizer and learning-rate schedule (the ``optim`` section)."""

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw | galore | natural_galore."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (never applied to biases, norms and embeddings)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: str = "cosine"
    """LR schedule: cosine (warmup then cosine) | wsd (warmup-stable-decay) | constant (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final decay."""
