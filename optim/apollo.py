"""APOLLO (Zhu et al., 2024) from the ``apollo-torch`` package, with a checkpointable state dict.

``apollo_torch.APOLLOAdamW`` keeps its projector, a Python object, in each projected weight's state,
which ``torch.load(weights_only=True)`` refuses. ``APOLLO`` steps exactly as the peer library does
and only changes what ``state_dict()`` holds: the projector's matrix and the seed of its next draw,
as plain tensors and integers, from which ``load_state_dict`` rebuilds it. Importing this module
imports ``apollo_torch`` (an optional dependency: the ``dev`` extra).
"""

from typing import Any

from apollo_torch import APOLLOAdamW
from apollo_torch.random_projector import GradientProjector

from .pickling import whole_state

SCALE_TYPES = ("channel", "tensor")
PROJECTIONS = ("random", "svd")
PROJ_TYPES = ("std", "reverse_std", "left", "right")

_MATRIX, _NEXT_SEED = "projector_matrix", "projector_seed"


class APOLLO(APOLLOAdamW):
    """``apollo_torch.APOLLOAdamW`` whose ``state_dict()`` loads with ``torch.load(weights_only=True)``.

    Param groups carrying ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``proj``
    (random | svd) and ``scale_type`` (channel | tensor) get APOLLO's scaled updates; the others plain
    AdamW, as in the peer library.
    """

    def __getstate__(self) -> dict[str, Any]:
        return whole_state(self)  # torch's drops apollo-torch's scale_front and disable_nl

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        plain = {}
        for index, state in state_dict["state"].items():
            state = dict(state)
            projector = state.pop("projector", None)
            if projector is not None and projector.ortho_matrix is not None:
                state[_MATRIX] = projector.ortho_matrix
                if isinstance(projector, GradientProjector):
                    state[_NEXT_SEED] = projector.seed
            plain[index] = state
        return {**state_dict, "state": plain}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or _MATRIX not in state:
                    continue
                matrix = state.pop(_MATRIX)
                projector = self._initialize_projector(group, state)
                projector.ortho_matrix = matrix.to(device=p.device)
                if isinstance(projector, GradientProjector):
                    projector.seed = int(state.pop(_NEXT_SEED))
                state["projector"] = projector

