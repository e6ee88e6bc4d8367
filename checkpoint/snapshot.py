"""The byte layout of one rank's in-memory snapshot, so that it can live in shared memory.

A snapshot is one contiguous run of bytes in a slot of host memory::

    MAGIC (8) | header length (8, little endian) | header | padding | tensor data, each aligned to 64

The header is a small ``torch.save`` of the state trees with every tensor replaced by a meta tensor
of the same shape and dtype (a skeleton), plus a table of where each held tensor's bytes start. It
is written at the step boundary; the tensor bytes are copied later, in the background (lazy.py).
Ranks of one node split the replicated tensors between them (``shard_of``), so a node holds one
copy of the model and optimizer, as REFT's sharded snapshots do; every rank holds its own per-rank
state. Anything that reads a snapshot back checks its digest first (see the keeper).
"""

import io
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..errors import UserError
from .disk import check_loadable

MAGIC = b"LTSNAP01"
ALIGN = 64
_PREFIX = struct.Struct("<8sQ")
_MAX_HEADER = 1 << 30

Buffer = bytes | bytearray | memoryview


class SnapshotError(UserError):
    """A snapshot in host memory is damaged, partial, or does not fit the state being restored."""


def flatten(tree: Any) -> tuple[Any, list[torch.Tensor]]:
    """Split a nested state into a skeleton (tensors as meta tensors) and its tensors in traversal order."""
    tensors: list[torch.Tensor] = []

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        if type(value) in (dict, OrderedDict):
            return type(value)((key, visit(item)) for key, item in value.items())
        if type(value) in (list, tuple):
            return type(value)(visit(item) for item in value)
        return value

    return visit(tree), tensors


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of ``flatten``: put ``tensors`` back where the skeleton has meta tensors, in order."""
    remaining = iter(tensors)

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return next(remaining)
        if type(value) in (dict, OrderedDict):
            return type(value)((key, visit(item)) for key, item in value.items())
        if type(value) in (list, tuple):
            return type(value)(visit(item) for item in value)
        return value

    return visit(skeleton)


def shard_of(tensors: list[torch.Tensor], parts: int) -> list[int]:
    """Which of ``parts`` ranks holds each tensor: largest first onto the least loaded, deterministically."""
    load = [0] * parts
    owner = [0] * len(tensors)
    for index in sorted(range(len(tensors)), key=lambda i: (-tensors[i].nbytes, i)):
        part = min(range(parts), key=lambda p: (load[p], p))
        owner[index] = part
        load[part] += tensors[index].nbytes
    return owner


@dataclass
class SnapshotPlan:
    """Where each tensor of one rank's snapshot goes in its slot, fixed at the step boundary."""

    prefix: bytes
    """Magic, header length and header: the first bytes of the slot."""
    copies: list[tuple[torch.Tensor, int]]
    """(source tensor, byte offset in the slot), one per distinct tensor this snapshot holds."""
    nbytes: int
    """Length of the whole snapshot in bytes."""


def plan_snapshot(step: int, identity: dict, groups: dict[str, dict], held: dict[str, list[bool]]) -> SnapshotPlan:
    """Lay out a snapshot of ``groups`` (group name -> {object name -> state dict}) at ``step``.

    ``held[group][i]`` says whether this snapshot holds the bytes of the group's i-th tensor (the
    others are held by other ranks of the node). ``identity`` (JSON-able) names the run and the rank
    and is checked on restore. Tensors that are views of one another are stored once.
    """
    skeletons, table, sources = {}, {}, []
    offset = 0
    seen: dict[tuple, int] = {}
    for group, states in groups.items():
        check_loadable(states, group)
        skeleton, tensors = flatten(states)
        if len(held[group]) != len(tensors):
            raise ValueError(f"{group}: {len(tensors)} tensors but {len(held[group])} ownership flags")
        skeletons[group] = skeleton
        entries = []
        for index, tensor in enumerate(tensors):
            if not held[group][index]:
                continue
            if tensor.layout != torch.strided or tensor.is_quantized:
                raise TypeError(f"{group}: tensor {index} has layout {tensor.layout}; snapshots hold dense tensors")
            key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
            if tensor.nbytes and key in seen:
                entries.append((index, seen[key], tensor.nbytes))
                continue
            seen[key] = offset
            entries.append((index, offset, tensor.nbytes))
            sources.append((tensor, offset))
            offset = _aligned(offset + tensor.nbytes)
        table[group] = entries
    header = {"step": step, "identity": identity, "skeletons": skeletons, "table": table, "data_bytes": offset}
    buffer = io.BytesIO()
    torch.save(header, buffer)
    header_bytes = buffer.getvalue()
    data_start = _aligned(_PREFIX.size + len(header_bytes))
    prefix = _PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes
    copies = [(tensor, data_start + at) for tensor, at in sources]
    return SnapshotPlan(prefix=prefix, copies=copies, nbytes=data_start + offset)


def read_header(data: Buffer, where: str) -> tuple[dict, int]:
    """The header of the snapshot at the start of ``data`` and where its tensor bytes start."""
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise SnapshotError(f"{where}: too short to hold a snapshot")
    magic, length = _PREFIX.unpack(view[: _PREFIX.size])
    if magic != MAGIC or length > min(_MAX_HEADER, len(view) - _PREFIX.size):
        raise SnapshotError(f"{where}: not a snapshot, or its header is damaged")
    try:
        header = torch.load(io.BytesIO(view[_PREFIX.size : _PREFIX.size + length]), weights_only=True)
        header["step"], header["table"], header["skeletons"], header["identity"], header["data_bytes"]
    except Exception as error:  # noqa: BLE001 - any failure to parse means damage
        raise SnapshotError(f"{where}: header cannot be read ({error})") from error
    data_start = _aligned(_PREFIX.size + length)
    if data_start + header["data_bytes"] > len(view):
        raise SnapshotError(f"{where}: truncated, {len(view)} bytes for {data_start + header['data_bytes']}")
    return header, data_start


def assemble(snapshots: list[tuple[Buffer, str]], rank: int, clone: bool = True) -> tuple[int, dict, dict]:
    """Rebuild (step, replicated states, ``rank``'s per-rank states) from a node's snapshots.

    ``snapshots`` are (bytes, name for messages) of every local rank, all of one step. Tensors are
    cloned out of the buffers (so the slots can be reused at once) unless ``clone`` is False: then
    each is a zero-copy tensor over its own bytes, for a caller done with them before the slots change.
    """
    parsed = [(data, where, *read_header(data, where)) for data, where in snapshots]
    steps = {header["step"] for _, _, header, _ in parsed}
    if len(steps) != 1:
        raise SnapshotError(f"snapshots of different steps {sorted(steps)} cannot be combined")
    replicated = _gather_group(parsed, "replicated", clone)
    own = [entry for entry in parsed if entry[2]["identity"]["rank"] == rank]
    if len(own) != 1:
        raise SnapshotError(f"no snapshot of rank {rank} among {[where for _, where in snapshots]}")
    per_rank = _gather_group(own, "per_rank", clone)
    return steps.pop(), replicated, per_rank


def digest(data: memoryview | bytes) -> str:
    """Checksum of snapshot bytes: XXH3-128 (about 9 GB/s here, against 0.8 GB/s for SHA-256)."""
    return xxhash.xxh3_128_hexdigest(data)


def _gather_group(parsed: list, group: str, clone: bool) -> dict:
    skeleton = parsed[0][2]["skeletons"][group]
    _, metas = flatten(skeleton)
    found: list[torch.Tensor | None] = [None] * len(metas)
    for data, where, header, data_start in parsed:
        if header["skeletons"][group].keys() != skeleton.keys():
            raise SnapshotError(f"{where}: its {group} state differs from the other ranks' snapshots")
        for index, offset, nbytes in header["table"][group]:
            meta = metas[index]
            if nbytes != meta.nbytes or data_start + offset + nbytes > len(memoryview(data).cast("B")):
                raise SnapshotError(f"{where}: entry {index} of {group} does not fit the snapshot")
            if nbytes == 0:
                found[index] = torch.empty(meta.shape, dtype=meta.dtype)
                continue
            tensor = torch.frombuffer(data, dtype=meta.dtype, count=meta.numel(), offset=data_start + offset)
            found[index] = tensor.view(meta.shape).clone() if clone else tensor.view(meta.shape)
    missing = [index for index, tensor in enumerate(found) if tensor is None]
    if missing:
        raise SnapshotError(f"{group} tensors {missing[:5]} are held by no snapshot (a local rank's is missing)")
    return unflatten(skeleton, found)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN
