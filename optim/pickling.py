"""Copying and pickling an optimizer whole.

``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``, so
``copy.deepcopy`` and ``pickle`` drop every other attribute: GaLore's refresh plan and stagger,
LISA's base optimizer and step count, APOLLO's ``scale_front``. The copy then fails at its first
step. Optimizers holding such attributes return ``whole_state(self)`` from ``__getstate__``; torch's
own ``__setstate__`` restores them and re-creates the hook registries.
"""

from typing import Any

from torch.optim import Optimizer


def whole_state(optimizer: Optimizer) -> dict[str, Any]:
    """Every attribute of ``optimizer`` except torch's hook registries, which torch itself never copies
    (a hook may be a closure that does not pickle)."""
    return {key: value for key, value in vars(optimizer).items()
            if not (key.startswith("_optimizer_") and key.endswith("_hooks"))}
