"""RMSNorm with fp32 statistics.

Under bf16 autocast (or with bf16 weights) the mean of squares is still taken in float32: the
reduction over the hidden size is where low precision hurts; a bf16 gain multiplies the fp32 result.
The result is cast back to the input's dtype so the residual stream keeps whatever precision it had.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension, with a learnable gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:  # same dtype for input and weight keeps torch on its fused kernel
            return F.rms_norm(x.float(), (self.dim,), self.weight, self.eps).type_as(x)
        # A low-precision gain multiplies the fp32 normalised input (the product is fp32): no fp32 copy of it is made.
        return (F.rms_norm(x.float(), (self.dim,), eps=self.eps) * self.weight).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
