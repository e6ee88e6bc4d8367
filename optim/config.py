"""Configuration of the optimizer and learning-rate schedule (the ``optim`` section)."""

from dataclasses import dataclass, field

# Attention and MLP blocks in leantrain's names (attention, feed_forward) and Hugging Face's (self_attn, mlp).
DEFAULT_TARGET_MODULES = ("attention", "attn", "feed_forward", "mlp")


@dataclass
class FrugalConfig:
    density: float = 0.25
    """Fraction of each projectable weight updated by the state-full optimizer."""
    update_gap: int = 200
    """Steps between subspace changes."""
    selection: str = "block"
    """Subspace: block | columns | rows | randk | svd | random."""
    block_order: str = "descending"
    """block selection order: random | ascending | descending (the paper's pretraining setting)."""
    state_free: str = "signsgd"
    """Rule for the residual: signsgd | sgd | none (GaLore-like)."""
    reset_statistics: bool = True
    """Reset the Adam state (and its step) when the subspace changes."""
    inactive_lr_scale: float = 1.0
    """LR scale of the state-free part."""
    state_full_lr_scale: float = 1.0
    """LR scale of the state-full part."""


@dataclass
class LisaConfig:
    n_layers: int = 2
    """Middle blocks trained at a time."""
    interval: int = 20
    """Steps between switches of the active blocks."""
    base: str = "adamw"
    """Optimizer of the active layers: adamw (torch's)."""
    layers_attr: str = ""
    """Dotted path of the block list; empty finds layers, model.layers, transformer.h, ..."""


@dataclass
class ApolloConfig:
    scale: float = 1.0
    """Multiplier of the scaled update (apollo-torch's documented default for APOLLO; 128 for APOLLO-Mini)."""
    scale_type: str = "channel"
    """Gradient scaling: channel (APOLLO) | tensor (APOLLO-Mini, with optim.rank=1)."""
    proj: str = "random"
    """Auxiliary subspace: random (seeded Gaussian, no SVD) | svd."""
    scale_front: bool = False
    """Apply the scale before the norm-growth limiter (the authors' choice for short warmups)."""
    norm_growth_limiter: bool = True
    """Fira's norm-growth limiter on the scaled update (apollo-torch's default)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw | galore | natural_galore | apollo | frugal | lisa."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (never applied to biases, norms and embeddings)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    state_bits: int = 32
    """Bits per Adam moment element: 32 | 8 (blockwise dynamic 8-bit; tensors < 4096 elements stay fp32)."""
    schedule: str = "cosine"
    """LR schedule: cosine (warmup then cosine) | wsd (warmup-stable-decay) | constant (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final decay."""
    rank: int = 128
    """galore, natural_galore, apollo: dimension of each projected gradient (capped at the matrix's smaller side)."""
    update_proj_gap: int = 200
    """galore, natural_galore, apollo: steps between refreshes of a matrix's projection subspace."""
    scale: float = 0.25
    """galore, natural_galore: multiplier of the update projected back to the full space."""
    proj_type: str = "std"
    """galore, natural_galore (and apollo, without full): projected side: std | reverse_std | left | right | full."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """galore, natural_galore, apollo, frugal: regexes; 2-D nn.Linear weights of matching modules are projected."""
    svd: str = "exact"
    """galore, natural_galore: subspace refresh: exact (full SVD, as galore-torch) | randomized (range finder)."""
    switch: str = "keep"
    """galore, natural_galore: Adam moments at a subspace change: keep | reset | rotate (into the new basis)."""
    stagger: bool | int = False
    """galore, natural_galore: spread refreshes over the gap: true (one matrix after another) or N waves."""
    history: int = 0
    """natural_galore: gradients in the Fisher (s); 0 = per matrix the most (<= 20) keeping state below AdamW's."""
    damping: float = 1e-3
    """natural_galore: damping lambda added to the empirical Fisher."""
    layerwise: bool = False
    """Step each parameter inside backward once its gradient is complete, freeing gradients early."""
    layerwise_clip: float = 0.0
    """layerwise: clip each parameter's gradient norm to this (global clipping is impossible); 0 disables."""
    frugal: FrugalConfig = field(default_factory=FrugalConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    apollo: ApolloConfig = field(default_factory=ApolloConfig)
    offload: str = "none"
    """Optimizer state and fp32 masters in host memory: none | cpu | interleaved (host/GPU split planned per step)."""
    offload_subgroup_size: int = 100_000_000
    """offload: parameters per subgroup (whole tensors), moved and updated together."""
    offload_cpu_threads: int = 0
    """offload: host threads updating subgroups at once; 0 = min(4, torch threads)."""
