"""Memory-efficient optimizers, each a drop-in ``torch.optim.Optimizer``.

``GaLoreAdamW`` and ``NaturalGaLoreAdamW`` (low-rank gradient projection), ``FRUGAL`` (state-full
updates in a subspace, state-free in the rest), ``LISA`` (layerwise importance sampling),
``LayerwiseOptimizer`` (per-parameter steps inside backward) and ``OffloadOptimizer`` (optimizer
state in host memory, interleaved host/GPU updates). Importing this pulls in torch and nothing else.
"""

from .frugal import FRUGAL
from .galore import GaLoreAdamW
from .layerwise import LayerwiseOptimizer
from .lisa import LISA
from .natural_galore import NaturalGaLoreAdamW
from .offload import OffloadOptimizer

__all__ = ["GaLoreAdamW", "NaturalGaLoreAdamW", "FRUGAL", "LISA", "LayerwiseOptimizer", "OffloadOptimizer"]
