"""Loading saved state into a run's objects: everything is checked before anything is loaded.

``load_state_dict`` of a module copies the tensors that fit before it reports those that do not,
so a checkpoint of a changed model would leave a half-loaded one behind; checking every object
first means a mismatch names all the differing keys and loads nothing.
"""

from typing import Any

import torch

from ..errors import UserError


def load_states(objects: dict[str, Any], states: dict[str, Any]) -> None:
    """Load every object, after checking all of them: a mismatch anywhere loads nothing."""
    problems = [problem for name, obj in objects.items() for problem in _mismatches(name, obj, states.get(name))]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(f"the checkpoint does not fit this run, nothing was loaded: {shown}")
    for name, obj in objects.items():
        obj.load_state_dict(states[name])


def _mismatches(name: str, obj: Any, saved: Any) -> list[str]:
    """What keeps ``saved`` from loading into ``obj``: missing or extra keys, different shapes (modules),
    different parameter groups or sizes (optimizers; the shapes of their state depend on the optimizer,
    GaLore's are projected). Other states check themselves when loading."""
    if saved is None:
        return [f"{name}: absent from the checkpoint"]
    if isinstance(obj, torch.nn.Module):
        current = obj.state_dict()
        problems = [f"{name}.{key}: missing from the checkpoint" for key in current if key not in saved]
        problems += [f"{name}.{key}: in the checkpoint, not in this model" for key in saved if key not in current]
        problems += [f"{name}.{key}: shape {list(saved[key].shape)} in the checkpoint, {list(value.shape)} here"
                     for key, value in current.items() if isinstance(value, torch.Tensor) and key in saved
                     and isinstance(saved[key], torch.Tensor) and saved[key].shape != value.shape]
        return problems
    if isinstance(obj, torch.optim.Optimizer) and isinstance(saved, dict) and "param_groups" in saved:
        now = [len(group["params"]) for group in obj.param_groups]
        before = [len(group["params"]) for group in saved["param_groups"]]
        return [f"{name}: parameter groups of sizes {before} in the checkpoint, {now} here"] if now != before else []
    return []
