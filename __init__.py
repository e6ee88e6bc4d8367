"""leantrain: memory-efficient training for PyTorch.

Subpackages: ``optim`` (GaLore, Natural GaLore, FRUGAL, LISA, per-layer updates, offload),
``nn`` (models, cut cross-entropy), ``moe``, ``checkpoint``, ``parallel`` and ``trainer``.
Importing ``leantrain`` pulls in nothing heavy; import the subpackage you need.
"""

__version__ = "0.1.0"
