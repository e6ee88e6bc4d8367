"""The mixture-of-experts feed-forward layer: a router, routed SwiGLU experts, optional shared experts.

It replaces the dense SwiGLU of a transformer block: ``MoELayer(dim, intermediate_size, cfg)``
maps [B, T, dim] to [B, T, dim]. Its balance statistics go into the ``BalanceCollector`` passed to
``forward``, never into module or global state, so the same layer serves training (collector)
and generation (none).
"""

import torch
from torch import nn

from ..nn.mlp import FeedForward
from .balance import BalanceCollector
from .config import MoEConfig, check_moe_config
from .experts import Experts
from .router import Router


def is_moe_block(cfg: MoEConfig, layer_index: int) -> bool:
    """Whether block ``layer_index`` (from 0) is an MoE block: every ``every_n_layers``-th one,
    counting from 1 as Qwen2-MoE's ``decoder_sparse_step`` does; none when num_experts is 0."""
    return cfg.num_experts > 0 and (layer_index + 1) % cfg.every_n_layers == 0


class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts plus ``cfg.shared_experts`` always-active ones (as one wider SwiGLU).

    ``intermediate_size`` is the model's SwiGLU width, used when ``cfg.intermediate_size`` is 0;
    ``layer_id`` names the layer in the collector's statistics.
    """

    def __init__(self, dim: int, intermediate_size: int, cfg: MoEConfig, layer_id: int = 0):
        super().__init__()
        check_moe_config(cfg)
        if cfg.num_experts == 0:
            raise ValueError("an MoELayer needs moe.num_experts > 0")
        hidden = cfg.intermediate_size or intermediate_size
        self.layer_id = layer_id
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = Router(dim, cfg.num_experts, cfg.top_k, cfg.renormalize)
        self.experts = Experts(dim, hidden, cfg.num_experts, cfg.impl)
        self.shared = FeedForward(dim, hidden * cfg.shared_experts) if cfg.shared_experts else None

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) for the router and input projections, Normal(0, out_std) for the
        projections back into the residual stream (the model's scaled residual init)."""
        nn.init.normal_(self.router.gate.weight, mean=0.0, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            nn.init.normal_(self.shared.w1.weight, mean=0.0, std=std)
            nn.init.normal_(self.shared.w3.weight, mean=0.0, std=std)
            nn.init.normal_(self.shared.w2.weight, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor, collector: BalanceCollector | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; records the routing into ``collector`` when one is given."""
        batch, seq_len, dim = x.shape
        tokens = x.reshape(batch * seq_len, dim)
        routing = self.router(tokens)
        counts = torch.bincount(routing.experts.flatten(), minlength=self.num_experts)
        out = self.experts(tokens, routing, counts)
        if collector is not None:
            collector.record(self.layer_id, routing, counts, batch)
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.view(batch, seq_len, dim)

    def active_flops_per_token(self) -> int:
        """Forward matmul FLOPs per token of the routed and shared experts (the router excluded)."""
        flops = self.experts.flops_per_token(self.top_k)
        if self.shared is not None:
            flops += 2 * 3 * self.shared.w1.in_features * self.shared.w1.out_features
        return flops
