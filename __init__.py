"""leantrain: memory-efficient training for PyTorch.

Subpackages: ``optim`` (GaLore, Natural GaLore, FRUGAL, LISA, per-layer updates, offload),
``nn`` (models, cut cross-entropy), ``moe``, ``checkpoint``, ``parallel`` and ``trainer``.
Importing ``leantrain`` pulls in nothing heavy; import the subpackage you need.
"""

__version__ = "0.1.0"

# Register leantrain's model with transformers' Auto classes once transformers is imported, without
# importing it here: `from leantrain.optim import GaLoreAdamW` stays as light as torch itself.
from .nn.hf_registration import install_transformers_hook  # noqa: E402

install_transformers_hook()
