"""Top-k softmax router: which experts see each token, and with what weight.

The router's matmul and softmax run in fp32 whatever the autocast or parameter dtype: its logits
feed the z-loss and its probabilities the load-balancing loss, and bf16 rounding of a softmax over
many experts visibly perturbs both.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """One layer's routing of N tokens to k of E experts."""

    logits: torch.Tensor
    """[N, E] fp32 router logits (the z-loss reads them)."""
    probs: torch.Tensor
    """[N, E] fp32 softmax of the logits (the load-balancing loss reads them)."""
    experts: torch.Tensor
    """[N, k] int64 chosen experts, most probable first."""
    weights: torch.Tensor
    """[N, k] fp32 gate weights of the chosen experts."""

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top_k: int, renormalize: bool = True) -> "Routing":
        """Softmax in fp32, then the top_k experts; ``renormalize`` rescales their probabilities to sum
        to 1. Also builds the routing of an HF MoE model from the router logits it returns."""
        logits = logits.float()
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return cls(logits=logits, probs=probs, experts=experts, weights=weights)


class Router(nn.Module):
    """A bias-free linear map to one logit per expert, softmax, then top-k.

    ``renormalize`` rescales the k chosen probabilities to sum to 1 (Mixtral); without it the
    gate weights are the raw probabilities (Qwen2-MoE, OLMoE).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool = True):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [N, dim] -> Routing of the N tokens."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        return Routing.from_logits(logits, self.top_k, self.renormalize)
