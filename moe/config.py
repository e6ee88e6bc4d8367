"""Configuration of mixture-of-experts layers (the ``moe`` section)."""

from dataclasses import dataclass

from ..errors import UserError

BALANCE_MODES = ("global", "micro", "sequence")
DISPATCH_IMPLS = ("auto", "grouped_mm", "loop")


@dataclass
class MoEConfig:
    num_experts: int = 0
    """Routed experts per MoE layer; 0 means a dense model."""
    top_k: int = 2
    """Experts each token is routed to."""
    shared_experts: int = 0
    """Always-active shared experts per MoE layer."""
    every_n_layers: int = 1
    """Every n-th block is an MoE block."""
    intermediate_size: int = 0
    """SwiGLU hidden size of each routed and shared expert; 0 takes model.intermediate_size."""
    renormalize: bool = True
    """Rescale each token's top-k gate weights to sum to 1 (Mixtral); false keeps the softmax probabilities (Qwen2-MoE, OLMoE)."""
    balance: str = "global"
    """Scope of the load-balancing loss: global (data-parallel group and accumulation window) | micro | sequence."""
    lbl_coef: float = 0.008
    """Weight of the load-balancing loss N_E sum_i f_i P_i, summed over MoE layers (0.008 in Demons in the Detail)."""
    micro_lbl_coef: float = 0.0
    """Weight of an extra micro-batch load-balancing loss on top of a global one (the paper's mix); 0 disables it."""
    z_loss_coef: float = 1e-3
    """Weight of the router z-loss mean(logsumexp(logits)^2) of ST-MoE, summed over MoE layers; 0 disables it."""
    impl: str = "auto"
    """Expert dispatch: auto | grouped_mm (torch._grouped_mm) | loop (one matmul per expert)."""


def check_moe_config(cfg: MoEConfig) -> None:
    """Raise UserError naming the first ``moe.*`` key whose value cannot work."""
    if cfg.num_experts < 0:
        raise UserError(f"moe.num_experts={cfg.num_experts} must be positive, or 0 for a dense model")
    if cfg.num_experts == 0:
        return
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise UserError(f"moe.top_k={cfg.top_k} must be between 1 and moe.num_experts={cfg.num_experts}")
    if cfg.shared_experts < 0:
        raise UserError(f"moe.shared_experts={cfg.shared_experts} must be 0 or more")
    if cfg.every_n_layers < 1:
        raise UserError(f"moe.every_n_layers={cfg.every_n_layers} must be at least 1")
    if cfg.intermediate_size < 0:
        raise UserError(f"moe.intermediate_size={cfg.intermediate_size} must be positive, or 0 to take the model's")
    if cfg.balance not in BALANCE_MODES:
        raise UserError(f"moe.balance={cfg.balance!r} is not a balance mode; valid: {', '.join(BALANCE_MODES)}")
    if cfg.impl not in DISPATCH_IMPLS:
        raise UserError(f"moe.impl={cfg.impl!r} is not a dispatch implementation; valid: {', '.join(DISPATCH_IMPLS)}")
    for name in ("lbl_coef", "micro_lbl_coef", "z_loss_coef"):
        if not getattr(cfg, name) >= 0:
            raise UserError(f"moe.{name}={getattr(cfg, name)} must be 0 or more")
