"""The training objective: a model that returns hidden states, and the loss that owns the output head.

``LanguageModelLoss`` puts the two in one module so that data-parallel wrappers see every parameter,
the output head included, used inside ``forward``. With ``loss.impl: cce`` the logits are never
materialised (``cut_ce.linear_cross_entropy``); ``naive`` builds the full logit matrix.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .cut_ce import IGNORE_INDEX, linear_cross_entropy

LOSS_IMPLS = ("cce", "naive")


@dataclass
class LossConfig:
    impl: str = "cce"
    """Cross-entropy implementation: cce (cut cross-entropy, never materialises the logits) | naive."""
    z_loss: float = 0.0
    """Coefficient of the z-loss (coef x logsumexp^2 per token, as in PaLM); 0 disables."""
    filter_eps: str = "none"
    """cce gradient filtering: none | auto (the dtype's epsilon / 32) | a number such as 1e-6."""
    chunk_mb: int = 128
    """cce: the largest temporary (one chunk of fp32 logits) in MiB."""


def parse_filter_eps(value: str) -> float | str | None:
    if value == "none":
        return None
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise UserError(f"loss.filter_eps: expected none, auto or a number, got {value!r}") from None


class LanguageModelLoss(nn.Module):
    """``forward(inputs, targets)`` returns the summed next-token loss over non-ignored targets."""

    def __init__(self, model: nn.Module, cfg: LossConfig | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg or LossConfig()
        self.filter_eps = parse_filter_eps(self.cfg.filter_eps)
        if self.cfg.chunk_mb <= 0:
            raise UserError(f"loss.chunk_mb must be positive, got {self.cfg.chunk_mb}")

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, balance=None) -> torch.Tensor:
        """``balance``: the MoE balance collector the model's MoE layers record into (None: no MoE losses)."""
        hidden = self.model(inputs) if balance is None else self.model(inputs, balance)
        return linear_cross_entropy(hidden, self.model.head_weight, targets, ignore_index=IGNORE_INDEX,
                                    reduction="sum", filter_eps=self.filter_eps, z_loss=self.cfg.z_loss,
                                    impl="auto" if self.cfg.impl == "cce" else "naive",
                                    chunk_bytes=self.cfg.chunk_mb << 20)
