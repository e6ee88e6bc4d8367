"""LISA: layerwise importance sampling (Pan et al., 2024).

The embedding, the output head, the final norm (everything outside the list of transformer blocks)
always train. Every ``interval`` steps ``n_layers`` of the blocks are drawn at random and the others
are frozen (``requires_grad=False``), so they cost neither weight gradients nor optimizer state.
Unlike LMFlow's ``DynamicLayerActivationCallback``, the optimizer state of a block that is switched off
is freed, so state memory follows the active blocks; a block switched on again starts fresh.

Draws come from a generator seeded with (seed, switch index): identical on every data-parallel rank
and after a resume, without communication.

Building a second LISA on the same model replaces the first: the block list remembers which of its
parameters were trainable before any LISA froze some, so the new one switches those, and the old one
refuses to step. ``copy.deepcopy`` and pickle of the model together with its LISA give a pair that
trains exactly as the original would.

Under DDP, wrap the model first with ``find_unused_parameters=True`` and then build LISA from the
wrapped model: DDP registers only the parameters that require gradients when it is built, and it must
be told that frozen blocks produce no gradient (a static graph does not fit a changing set).
"""

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ..errors import UserError
from .adamw import AdamW
from .groups import decay_groups, zero_step
from .moments import check_state_bits
from .pickling import whole_state

LAYER_LIST_PATHS = (
    "layers", "model.layers", "transformer.h", "transformer.layers", "model.decoder.layers",
    "gpt_neox.layers", "model.language_model.layers", "transformer.blocks", "blocks",
)
"""Where the block list lives: leantrain and LLaMA-style models, GPT-2, OPT, GPT-NeoX, HF multimodal."""


def find_layer_list(model: nn.Module, layers_attr: str | None = None) -> tuple[str, nn.ModuleList]:
    """The dotted path and the ``nn.ModuleList`` of transformer blocks of ``model``.

    ``layers_attr`` names the path explicitly; otherwise the first of ``LAYER_LIST_PATHS`` that exists.
    """
    candidates = (layers_attr,) if layers_attr else LAYER_LIST_PATHS
    for path in candidates:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return path, module
        if layers_attr:
            raise UserError(f"LISA layers_attr {layers_attr!r} is a {type(module).__name__}, not an nn.ModuleList")
    if layers_attr:
        raise UserError(f"LISA layers_attr {layers_attr!r}: {type(model).__name__} has no such submodule")
    raise UserError(f"LISA cannot find the list of transformer blocks of {type(model).__name__} (tried "
                    f"{', '.join(LAYER_LIST_PATHS)}); name it with layers_attr, e.g. 'model.layers'")


def sample_layers(n_total: int, n_active: int, seed: int, switch_index: int) -> list[int]:
    """The sorted block indices active after switch ``switch_index``; a pure function of its arguments."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + switch_index) % (2**63))
    return sorted(torch.randperm(n_total, generator=generator)[:n_active].tolist())


@dataclass
class BlockClaim:
    """Left on the block list by the first LISA built on it and shared by later ones (a plain attribute, so
    it travels with the model through copy.deepcopy and pickle)."""

    trainable: list[list[str]]
    """Per block, the names of its parameters that required gradients before LISA first froze any."""
    generation: int = 0
    """How many LISAs have been built on the block list; only the latest may step."""


CLAIM_ATTR = "_lisa_claim"


class LISA(Optimizer):
    """An optimizer over ``model`` that trains a random few transformer blocks at a time.

    It wraps a base optimizer built over all trainable parameters and shares its ``param_groups``
    and ``state``, so LR schedulers, gradient clipping and ``zero_grad`` work as with the base.
    ``step()`` steps the base optimizer and, every ``interval`` steps, switches the active blocks.

    Args:
        model: the model, or its ``DistributedDataParallel`` wrapper (built with
            ``find_unused_parameters=True``).
        base_optimizer: builds the optimizer from param groups (decayed matrices, undecayed vectors);
            default ``torch.optim.AdamW`` with ``lr``, ``betas`` and ``eps``, or leantrain's ``AdamW``
            (``state_bits=8``, or bf16 weights, which it rounds stochastically with ``seed``).
        n_layers: blocks trained at a time.
        interval: optimizer steps between switches.
        seed: seed of the draws.
        layers_attr: dotted path of the block list; found automatically when None.
        weight_decay: decoupled weight decay of matrices (never of vectors).
        state_bits: 32 | 8, the default base optimizer's moments.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: Callable[[list[dict[str, Any]]], Optimizer] | None = None,
        *,
        n_layers: int = 2,
        interval: int = 20,
        seed: int = 0,
        layers_attr: str | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_bits: int = 32,
    ):
        if isinstance(model, DistributedDataParallel):
            if not model.find_unused_parameters or model.static_graph:
                raise UserError("LISA under DDP needs DistributedDataParallel(find_unused_parameters=True) without "
                                "static_graph: frozen blocks produce no gradients")
            model = model.module
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        self.layers_path, self.layers = find_layer_list(model, layers_attr)
        if not 0 <= n_layers <= len(self.layers):
            raise UserError(f"LISA n_layers must be in [0, {len(self.layers)}] (the blocks of "
                            f"{self.layers_path}), got {n_layers}")
        if interval < 1:
            raise UserError(f"LISA interval must be a positive number of steps, got {interval}")
        self.n_layers, self.interval, self.seed = n_layers, interval, seed
        # Only what was trainable before LISA is ever switched on: user-frozen parameters stay frozen. A
        # LISA built earlier on these blocks froze some of them itself; its claim says what they were.
        claim = getattr(self.layers, CLAIM_ATTR, None)
        if claim is None:
            claim = BlockClaim([[n for n, p in layer.named_parameters() if p.requires_grad] for layer in self.layers])
            setattr(self.layers, CLAIM_ATTR, claim)
        claim.generation += 1
        self._claim, self._generation = claim, claim.generation
        self._trainable = [[layer.get_parameter(name) for name in names]
                           for layer, names in zip(self.layers, claim.trainable)]
        for params in self._trainable:  # the blocks a replaced LISA froze train again, as in the base's groups
            for p in params:
                p.requires_grad_(True)
        check_state_bits(state_bits, "LISA state_bits")
        if base_optimizer is not None and state_bits != 32:
            raise UserError("LISA: pass state_bits to the base optimizer you build, not to LISA")
        if base_optimizer is None and (state_bits != 32 or any(p.dtype != torch.float32 for p in model.parameters())):
            base_optimizer = functools.partial(AdamW, lr=lr, betas=betas, eps=eps, state_bits=state_bits, seed=seed)
        factory = base_optimizer or functools.partial(torch.optim.AdamW, lr=lr, betas=betas, eps=eps)
        self.base = factory(decay_groups(model.named_parameters(), weight_decay))
        super().__init__(self.base.param_groups, self.base.defaults)
        self._share_base()
        self.steps = 0
        self.active_layers: list[int] = []
        self._activate(sample_layers(len(self.layers), n_layers, seed, 0))

    def __getstate__(self) -> dict[str, Any]:
        return whole_state(self)  # torch's keeps neither the base optimizer nor the blocks

    def _share_base(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Step the base optimizer; switch the active blocks every ``interval`` steps."""
        if self._claim.generation != self._generation:
            raise UserError(f"this LISA was replaced by a LISA built later on the same model ({self.layers_path}); "
                            "step that one")
        loss = self.base.step(closure) if closure is not None else self.base.step()
        self.steps += 1
        if self.steps % self.interval == 0:
            self._activate(sample_layers(len(self.layers), self.n_layers, self.seed, self.steps // self.interval))
        return loss

    def _activate(self, active: Iterable[int]) -> None:
        """Unfreeze the blocks in ``active``; freeze the others, dropping their gradients and state."""
        active = set(active)
        for i, params in enumerate(self._trainable):
            for p in params:
                p.requires_grad_(i in active)
                if i not in active:
                    p.grad = None
                    self.base.state.pop(p, None)
        self.active_layers = sorted(active)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, its first param group carrying a ``lisa`` entry (step count, active
        blocks): torch.distributed.checkpoint's ``get_state_dict`` keeps only "state" and "param_groups"."""
        state = self.base.state_dict()
        lisa = {"steps": self.steps, "active_layers": list(self.active_layers), "n_blocks": len(self.layers)}
        state["param_groups"] = [{**state["param_groups"][0], "lisa": lisa}, *state["param_groups"][1:]]
        return state

    def prepare_load(self, step: int) -> None:
        """Give this fresh optimizer the blocks and state keys a run has after ``step`` steps.

        The active blocks are a function of the seed and the step, so replaying step ``step`` on zero
        gradients at learning rate 0 sets them; a template state dict for torch.distributed.checkpoint
        (``get_state_dict`` before ``dcp.load``) then holds the keys the saved state has.
        """
        if step < 1:
            return
        self.steps = step - 1
        self._activate(sample_layers(len(self.layers), self.n_layers, self.seed, self.steps // self.interval))
        zero_step(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        groups = [dict(group) for group in state_dict["param_groups"]]
        lisa = state_dict.pop("lisa", None) or (groups[0].pop("lisa", None) if groups else None)
        state_dict["param_groups"] = groups
        if lisa is None:
            raise UserError("optimizer state has no 'lisa' entry: it was not saved by LISA")
        if lisa["n_blocks"] != len(self.layers):
            raise UserError(f"optimizer state was saved by LISA over {lisa['n_blocks']} blocks; "
                            f"{self.layers_path} has {len(self.layers)}")
        self.steps = int(lisa["steps"])
        self._activate(lisa["active_layers"])
        self.base.load_state_dict(state_dict)
        # Optimizer.load_state_dict replaces the state and group containers: point at the new ones.
        self._share_base()
