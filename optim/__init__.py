"""Memory-efficient optimizers, each a drop-in ``torch.optim.Optimizer``.

``GaLoreAdamW`` and ``NaturalGaLoreAdamW`` (low-rank gradient projection), ``FRUGAL`` (state-full
updates in a subspace, state-free in the rest), ``LISA`` (layerwise importance sampling),
``LayerwiseOptimizer`` (per-parameter steps inside backward) and ``OffloadOptimizer`` (optimizer
state in host memory, interleaved host/GPU updates). ``AdamW`` is torch's AdamW with 8-bit moments
(``state_bits=8``, or ``AdamW8bit``) and stochastic rounding of bf16 weights; every optimizer here
takes ``state_bits`` (``GaLoreAdamW8bit`` is GaLore's). Importing this pulls in torch and nothing else.
"""

from .adamw import AdamW, AdamW8bit
from .frugal import FRUGAL
from .galore import GaLoreAdamW, GaLoreAdamW8bit
from .layerwise import LayerwiseOptimizer
from .lisa import LISA
from .natural_galore import NaturalGaLoreAdamW
from .offload import OffloadOptimizer

__all__ = ["AdamW", "AdamW8bit", "GaLoreAdamW", "GaLoreAdamW8bit", "NaturalGaLoreAdamW", "FRUGAL", "LISA",
           "LayerwiseOptimizer", "OffloadOptimizer"]
