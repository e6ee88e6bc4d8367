"""Updates of bf16 weights: computed in float32, written back with stochastic rounding.

A bf16 weight has 8 significant bits: an update below half its ulp rounds away to nothing with
round-to-nearest, so small learning rates stall (the weight stops moving once lr * update is
below ~0.4% of it). Stochastic rounding rounds up with probability equal to the fraction of the
ulp, so every update moves the weight in expectation and the rounding errors are unbiased noise.
We choose it over Kahan compensation because it needs no extra state (Kahan keeps a bf16
compensation buffer per weight, +2 bytes per parameter, which the 7B plan within 22 GiB cannot
spare) and it works for any update written to the weight, full-rank or projected.

The random bits come from a generator seeded by (seed, parameter ordinal, step): a counter-based
stream, so a resumed run draws exactly what the uninterrupted one would have without any
generator state to save (the step is already in the optimizer state), and the draws do not depend
on the order in which parameters are stepped (per-layer updates step them in backward's order).
An optimizer's ordinals are the positions of its parameters plus its ``rounding_offset`` (0):
``LayerwiseOptimizer``, which gives each parameter an optimizer of its own, sets it to the
parameter's position, so every parameter draws its own stream, the one it would draw unwrapped.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .moments import CHUNK_NUMEL

_MASK = -(1 << 16)  # 0xFFFF0000 as int32: the bits a float32 shares with its bf16 truncation


def needs_rounding(p: torch.Tensor) -> bool:
    """Whether ``p``'s updates are computed in float32 and rounded stochastically into it."""
    return p.dtype == torch.bfloat16


def rounding_generator(device: torch.device, seed: int, ordinal: int, step: int) -> torch.Generator:
    """The generator of parameter ``ordinal``'s rounding at ``step``: depends on nothing else."""
    mixed = ((seed * 1_000_003 + ordinal) * 1_000_033 + step) * 7_919 % (2**63)
    return torch.Generator(device=device).manual_seed(mixed)


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """Write float32 ``value`` into bf16 ``target``, rounding up with probability of the discarded fraction.

    Adding 16 uniform random bits to the float32 bit pattern and truncating to the upper 16 rounds
    the magnitude up exactly when the random bits exceed the discarded ones' complement: an unbiased
    rounding to one of the two neighbouring bf16 values. Infinities and NaN pass through unchanged.
    ``target`` and ``value`` have the same shape; large ones go a range at a time.
    """
    if not target.is_contiguous():
        out = torch.empty(target.shape, dtype=target.dtype, device=target.device)
        stochastic_round_(out, value, generator)
        target.copy_(out)
        return
    flat_value = value.reshape(-1)
    flat_target = target.view(-1)
    for start in range(0, flat_value.numel(), CHUNK_NUMEL):
        chunk = flat_value[start:start + CHUNK_NUMEL].contiguous()
        bits = torch.randint(0, 1 << 16, chunk.shape, dtype=torch.int32, device=chunk.device, generator=generator)
        bits.add_(chunk.view(torch.int32)).bitwise_and_(_MASK)
        rounded = torch.where(torch.isfinite(chunk), bits.view(torch.float32), chunk)
        flat_target[start:start + CHUNK_NUMEL].copy_(rounded)  # exact: the low 16 bits are zero


@contextmanager
def float32_update(target: torch.Tensor, seed: int, ordinal: int, step: int) -> Iterator[torch.Tensor]:
    """The tensor to update in place: ``target`` itself, or for bf16 a float32 copy rounded back on exit.

    Float32 (and float64) weights are updated exactly as before: no copy, no rounding.
    """
    if not needs_rounding(target):
        yield target
        return
    work = target.float()
    yield work
    stochastic_round_(target, work, rounding_generator(target.device, seed, ordinal, step))
