"""The byte layout of one rank's in-memory snapshot, so that it can live in shared memory.

A snapshot is one contiguous run of bytes in a slot of host memory::

    MAGIC (8) | header length (8, little endian) | JSON header | padding | tensor data, each aligned to 64

The header holds the state trees as a JSON skeleton (every tensor replaced by its index, dtype and
shape; tuples, int dict keys, dtypes and the like tagged so that they read back as they were) and a
table of where each held tensor's bytes start. JSON keeps the step boundary cheap (no pickling
hook per object, unlike ``torch.save``) and reading safe (no unpickling at all). The header is
written at the step boundary; the tensor bytes are copied later, in the background (lazy.py).
Ranks of one node split the replicated tensors between them (``shard_of``), so a node holds one
copy of the model and optimizer, as REFT's sharded snapshots do; every rank holds its own per-rank
state. Anything that reads a snapshot back checks its digest first (see the keeper).
"""

import json
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..errors import UserError

MAGIC = b"LTSNAP02"
ALIGN = 64
_PREFIX = struct.Struct("<8sQ")
_MAX_HEADER = 1 << 30
_SCALARS = (int, float, str, bool, type(None))

Buffer = bytes | bytearray | memoryview


class SnapshotError(UserError):
    """A snapshot in host memory is damaged, partial, or does not fit the state being restored."""


def flatten(tree: Any, where: str = "state") -> tuple[Any, list[torch.Tensor]]:
    """Split a nested state into a JSON-able skeleton and its tensors in traversal order.

    Accepts what ``torch.load(weights_only=True)`` accepts in a checkpoint (exact types: tensors,
    numbers, strings, None, dtypes, devices, and dicts, lists and tuples of them); anything else is
    a TypeError naming where it sits.
    """
    tensors: list[torch.Tensor] = []

    def visit(value: Any, path: str) -> Any:
        kind = type(value)
        if kind in _SCALARS:
            return value
        if isinstance(value, torch.Tensor) and kind in (torch.Tensor, torch.nn.Parameter):
            tensors.append(value)
            return {"T": [len(tensors) - 1, str(value.dtype).removeprefix("torch."), list(value.shape)]}
        if kind in (dict, OrderedDict):
            pairs = []
            for key, item in value.items():
                if type(key) not in _SCALARS:
                    raise TypeError(f"{path}: key {key!r} is a {type(key).__name__}; use str or int keys")
                pairs.append([key, visit(item, f"{path}.{key}")])
            return {"d" if kind is dict else "o": pairs}
        if kind in (list, tuple, torch.Size):
            items = [visit(item, f"{path}[{i}]") for i, item in enumerate(value)]
            return items if kind is list else {"t" if kind is tuple else "S": items}
        if kind is complex:
            return {"c": [value.real, value.imag]}
        if kind is torch.dtype:
            return {"y": str(value).removeprefix("torch.")}
        if kind is torch.device:
            return {"v": str(value)}
        raise TypeError(
            f"{path} is a {kind.__name__}: checkpoints hold only tensors, numbers, strings, bools, None, dtypes, "
            "devices and lists, tuples and dicts of them (exact types); convert it"
        )

    return visit(tree, where), tensors


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of ``flatten``: the state with ``tensors[i]`` where the skeleton has tensor i."""

    def visit(value: Any) -> Any:
        if isinstance(value, list):
            return [visit(item) for item in value]
        if not isinstance(value, dict):
            return value
        (tag, body), = value.items()
        if tag == "T":
            return tensors[body[0]]
        if tag in ("d", "o"):
            return (dict if tag == "d" else OrderedDict)((key, visit(item)) for key, item in body)
        if tag == "t":
            return tuple(visit(item) for item in body)
        if tag == "S":
            return torch.Size(body)
        if tag == "c":
            return complex(*body)
        if tag == "y":
            return _dtype(body)
        if tag == "v":
            return torch.device(body)
        raise ValueError(f"unknown skeleton tag {tag!r}")

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


def plan_snapshot(step: int, identity: dict, flat: dict[str, tuple[Any, list[torch.Tensor]]],
                  held: dict[str, list[bool]]) -> SnapshotPlan:
    """Lay out a snapshot of flattened groups (group name -> ``flatten`` of {object name -> state}).

    ``held[group][i]`` says whether this snapshot holds the bytes of the group's i-th tensor (the
    others are held by other ranks of the node). ``identity`` (JSON-able) names the rank and is
    checked on restore. Tensors that are views of one another are stored once.
    """
    table, sources = {}, []
    offset = 0
    seen: dict[tuple, int] = {}
    for group, (_, tensors) in flat.items():
        if len(held[group]) != len(tensors):
            raise ValueError(f"{group}: {len(tensors)} tensors but {len(held[group])} ownership flags")
        entries = []
        for index, tensor in enumerate(tensors):
            if not held[group][index]:
                continue
            if tensor.layout != torch.strided or tensor.is_quantized:
                raise TypeError(f"{group}: tensor {index} has layout {tensor.layout}; snapshots hold dense tensors")
            key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
            if tensor.nbytes and key in seen:
                entries.append([index, seen[key], tensor.nbytes])
                continue
            seen[key] = offset
            entries.append([index, offset, tensor.nbytes])
            sources.append((tensor, offset))
            offset = _aligned(offset + tensor.nbytes)
        table[group] = entries
    header = {"step": step, "identity": identity, "skeletons": {group: skeleton for group, (skeleton, _) in flat.items()},
              "counts": {group: len(tensors) for group, (_, tensors) in flat.items()}, "table": table,
              "data_bytes": offset}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
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
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + length]))
        header["step"], header["table"], header["skeletons"], header["identity"], header["counts"]
        data_bytes = int(header["data_bytes"])
    except (ValueError, KeyError, TypeError) as error:
        raise SnapshotError(f"{where}: header cannot be read ({error})") from error
    data_start = _aligned(_PREFIX.size + length)
    if data_start + data_bytes > len(view):
        raise SnapshotError(f"{where}: truncated, {len(view)} bytes for {data_start + data_bytes}")
    return header, data_start


def assemble(snapshots: list[tuple[Buffer, str]], clone: bool = True) -> tuple[int, dict, dict[int, dict]]:
    """Rebuild (step, replicated states, {rank: per-rank states}) from the snapshots of a node's ranks.

    ``snapshots`` are (bytes, name for messages) of every local rank, all of one step; the per-rank
    states are those of the ranks that took them. Tensors are cloned out of the buffers (so the
    slots can be reused at once) unless ``clone`` is False: then each is a zero-copy tensor over its
    own bytes, for a caller done with them before the slots change.
    """
    parsed = [(data, where, *read_header(data, where)) for data, where in snapshots]
    steps = {header["step"] for _, _, header, _ in parsed}
    if len(steps) != 1:
        raise SnapshotError(f"snapshots of different steps {sorted(steps)} cannot be combined")
    try:
        replicated = _gather_group(parsed, "replicated", clone)
        per_rank = {entry[2]["identity"]["rank"]: _gather_group([entry], "per_rank", clone) for entry in parsed}
    except (ValueError, TypeError, KeyError, IndexError) as error:
        names = ", ".join(where for _, where in snapshots)
        raise SnapshotError(f"{names}: the snapshot's header does not describe its contents ({error})") from error
    if len(per_rank) != len(parsed):
        raise SnapshotError(f"two of {[where for _, where in snapshots]} are snapshots of the same rank")
    return steps.pop(), replicated, per_rank


def digest(data: Buffer) -> str:
    """Checksum of snapshot bytes: XXH3-128 (about 9 GB/s here, against 0.8 GB/s for SHA-256)."""
    return xxhash.xxh3_128_hexdigest(data)


def _gather_group(parsed: list, group: str, clone: bool) -> Any:
    skeleton = parsed[0][2]["skeletons"][group]
    metas = _tensor_metas(skeleton, parsed[0][2]["counts"][group])
    found: list[torch.Tensor | None] = [None] * len(metas)
    for data, where, header, data_start in parsed:
        if header["skeletons"][group] != skeleton and group == "replicated":
            raise SnapshotError(f"{where}: its replicated state differs from the other local ranks' snapshots")
        for index, offset, nbytes in header["table"][group]:
            if not 0 <= index < len(metas):
                raise SnapshotError(f"{where}: entry {index} of {group} is not in its skeleton")
            dtype, shape = metas[index]
            count = shape.numel()
            if nbytes != count * dtype.itemsize or data_start + offset + nbytes > len(memoryview(data).cast("B")):
                raise SnapshotError(f"{where}: entry {index} of {group} does not fit the snapshot")
            if nbytes == 0:
                found[index] = torch.empty(shape, dtype=dtype)
                continue
            tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=data_start + offset).view(shape)
            found[index] = tensor.clone() if clone else tensor
    missing = [index for index, tensor in enumerate(found) if tensor is None]
    if missing:
        raise SnapshotError(f"{group} tensors {missing[:5]} are held by no snapshot (a local rank's is missing)")
    return unflatten(skeleton, found)


def _tensor_metas(skeleton: Any, count: int) -> list[tuple[torch.dtype, torch.Size]]:
    """(dtype, shape) of every tensor in a skeleton, by index."""
    metas: list = [None] * count

    def visit(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            (tag, body), = value.items()
            if tag == "T":
                index, dtype, shape = body
                metas[index] = (_dtype(dtype), torch.Size(shape))
            elif tag in ("d", "o"):
                for _, item in body:
                    visit(item)
            elif tag == "t":
                visit(body)

    visit(skeleton)
    if any(meta is None for meta in metas):
        raise SnapshotError("a snapshot's skeleton lacks some of its tensors")
    return metas


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN
