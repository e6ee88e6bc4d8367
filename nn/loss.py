"""The training objective: a model that returns hidden states, and the loss that owns the output head.

``LanguageModelLoss`` puts the two in one module so that data-parallel wrappers see every parameter,
the output head included, used inside ``forward``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
LOSS_IMPLS = ("naive",)


@dataclass
class LossConfig:
    impl: str = "naive"
    """Cross-entropy implementation: naive (materialises the logits)."""


def naive_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed cross-entropy through the full logit matrix (materialised, in fp32)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index, reduction="sum")


class LanguageModelLoss(nn.Module):
    """``forward(inputs, targets)`` returns the summed next-token loss over non-ignored targets."""

    def __init__(self, model: nn.Module, impl: str = "naive", ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.model = model
        self.impl = impl
        self.ignore_index = ignore_index

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs)
        return naive_cross_entropy_sum(hidden, self.model.head_weight, targets, self.ignore_index)
