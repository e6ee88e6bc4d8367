"""Adam's two moments in an optimizer state: float32 tensors, or 8-bit codes with per-block maxima.

With ``state_bits=32`` a state holds ``exp_avg`` and ``exp_avg_sq`` as they are (float32, or float64
for float64 parameters). With ``state_bits=8`` a moment of at least ``MIN_QUANTIZED_NUMEL`` elements
is stored as ``<name>_codes`` (uint8, the moment's shape, so it can be sharded like it) and
``<name>_absmax`` (float32, one entry per block of 256); smaller ones stay float32 under the plain
names. A step reads a moment (dequantised into a float32 temporary, or the state tensor itself),
updates it in float32 and writes it back (requantised, or nothing to do), a range of elements at a
time for large tensors, so no temporary larger than ``CHUNK_NUMEL`` elements appears.
"""

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import UserError
from .quantize import BLOCK_SIZE, MIN_QUANTIZED_NUMEL, STATE_BITS, CodeTable, dequantize, num_blocks, quantize_

MOMENTS = ("exp_avg", "exp_avg_sq")
SIGNED = {"exp_avg": True, "exp_avg_sq": False}
CHUNK_NUMEL = 1 << 22
"""Elements per range of a large tensor's update (16 MiB of float32 temporaries each); whole blocks."""
assert CHUNK_NUMEL % BLOCK_SIZE == 0


def check_state_bits(state_bits: Any, key: str = "state_bits") -> int:
    """``state_bits`` as 32 or 8, or a UserError naming ``key``."""
    if isinstance(state_bits, bool) or state_bits not in STATE_BITS:
        raise UserError(f"{key} must be 32 or 8 (bits per optimizer-state element), got {state_bits!r}")
    return int(state_bits)


def moment_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 moments for float32 and lower-precision weights; float64 ones for float64 weights."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class CodeTables:
    """The signed and unsigned code tables on each device, made on first use (each optimizer holds one).

    Made lazily rather than at import, so an optimizer traced on fake tensors (``leantrain estimate``)
    gets fake tables and a real one real tables.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple[torch.device, bool], CodeTable] = {}

    def get(self, device: torch.device, signed: bool) -> CodeTable:
        key = (torch.device(device), signed)
        if key not in self._tables:
            self._tables[key] = CodeTable(signed, device)
        return self._tables[key]


def init_moments(state: dict[str, Any], shape: tuple[int, ...] | torch.Size, device: torch.device,
                 dtype: torch.dtype, state_bits: int) -> None:
    """Zero moments of ``shape``: float32 (``dtype``) or, for 8 bits and large enough, codes and maxima."""
    numel = math.prod(shape)
    for name in MOMENTS:
        for key in (name, f"{name}_codes", f"{name}_absmax"):
            state.pop(key, None)
        if state_bits == 8 and numel >= MIN_QUANTIZED_NUMEL:
            # All-zero maxima make every code dequantise to zero, whatever the code.
            state[f"{name}_codes"] = torch.zeros(shape, dtype=torch.uint8, device=device)
            state[f"{name}_absmax"] = torch.zeros(num_blocks(numel), dtype=torch.float32, device=device)
        else:
            state[name] = torch.zeros(shape, dtype=dtype, device=device)


def is_quantized(state: dict[str, Any]) -> bool:
    return "exp_avg_codes" in state


def moment_shape(state: dict[str, Any]) -> torch.Size:
    return state["exp_avg_codes"].shape if is_quantized(state) else state["exp_avg"].shape


def chunks(numel: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of at most ``CHUNK_NUMEL`` elements, each starting on a block boundary."""
    for start in range(0, numel, CHUNK_NUMEL):
        yield start, min(start + CHUNK_NUMEL, numel)


def read(state: dict[str, Any], tables: CodeTables, start: int | None = None, stop: int | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) in float precision: the state tensors themselves, or dequantised copies.

    Without a range, the whole moments in their shape; with one, flat elements [start, stop).
    """
    out = []
    for name in MOMENTS:
        if name in state:
            t = state[name]
            out.append(t if start is None else t.view(-1)[start:stop])
            continue
        codes, absmax = state[f"{name}_codes"], state[f"{name}_absmax"]
        table = tables.get(codes.device, SIGNED[name])
        if start is None:
            out.append(dequantize(codes, absmax, table).view(codes.shape))
        else:
            out.append(dequantize(codes.view(-1)[start:stop], absmax[start // BLOCK_SIZE: num_blocks(stop)], table))
    return out[0], out[1]


def write(state: dict[str, Any], tables: CodeTables, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
          start: int | None = None, stop: int | None = None) -> None:
    """Store moments that ``read`` gave (and the step updated): requantise them; float32 ones are in place."""
    for name, value in zip(MOMENTS, (exp_avg, exp_avg_sq)):
        if name in state:
            continue
        codes, absmax = state[f"{name}_codes"], state[f"{name}_absmax"]
        table = tables.get(codes.device, SIGNED[name])
        if start is None:
            quantize_(value, table, codes, absmax)
        else:
            quantize_(value, table, codes.view(-1)[start:stop], absmax[start // BLOCK_SIZE: num_blocks(stop)])


def zero(state: dict[str, Any]) -> None:
    """Set both moments to zero."""
    for name in MOMENTS:
        if name in state:
            state[name].zero_()
        else:
            state[f"{name}_codes"].zero_()
            state[f"{name}_absmax"].zero_()


def transform(state: dict[str, Any], tables: CodeTables,
              fn: Callable[[str, torch.Tensor], torch.Tensor], state_bits: int) -> None:
    """Replace each moment by ``fn(name, moment)`` (any shape): through float32 when quantised."""
    exp_avg, exp_avg_sq = read(state, tables)
    new = {name: fn(name, value) for name, value in zip(MOMENTS, (exp_avg, exp_avg_sq))}
    dtype = new["exp_avg"].dtype
    init_moments(state, new["exp_avg"].shape, new["exp_avg"].device, dtype, state_bits)
    for name, value in new.items():
        if name in state:
            state[name].copy_(value)
    write(state, tables, new["exp_avg"], new["exp_avg_sq"])


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo ``Optimizer.load_state_dict``'s casts of state tensors to their parameter's dtype.

    torch casts every state tensor but ``step`` to the parameter's dtype: uint8 codes would become
    floats and float32 moments of bf16 weights bf16. Each tensor is put back in its saved dtype
    (the values are the saved ones), on the device the load chose.
    """
    saved = state_dict["state"]
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(ids, params):
        if pid not in saved or p not in optimizer.state:
            continue
        state = optimizer.state[p]
        for key, value in saved[pid].items():
            loaded = state.get(key)
            if (isinstance(value, torch.Tensor) and isinstance(loaded, torch.Tensor)
                    and loaded.dtype != value.dtype):
                state[key] = value.detach().to(device=loaded.device, dtype=value.dtype, copy=True)
