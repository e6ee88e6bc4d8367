"""Lazy multi-level checkpointing (``checkpoint.mode=lazy``): the trainer's side.

Level 1 (host memory): at a step boundary ``after_step`` lays out a snapshot in a slot of the
node keeper's shared memory and returns; its tensors are copied in the background during the next
forward and backward (lazy.py), and ``wait_before_step`` (plus a pre-hook on each optimizer, for
updates that run inside backward) waits only for copies not yet done. Level 2 (disk) and level 3
(a second directory) are written by the keepers from level 1 (levels.py), erasure coding across
nodes too (parity.py): the training process never waits for them.

One snapshot is in flight at a time. The next request first waits until every rank has committed
the previous one (a barrier), so the newest snapshot held by every rank is known and kept while
its successor is written; a keeper with no slot to spare makes the request wait (backpressure).

Restore tries, newest step first: every node's own memory ("memory"), memory rebuilt from the
group's parity for nodes that lost theirs ("peer"), then the newest good disk checkpoint ("disk").
"""

import json
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError
from .disk import CheckpointError, find_checkpoints, write_final_weights
from .keeper_client import KeeperClient, advertised_host, node_name
from .lazy import Copier, LazyCopy, pin_host_memory, unpin_host_memory
from .parity import group_of
from .snapshot import assemble, flatten, plan_snapshot, shard_of
from .states import load_states as _load_states

if TYPE_CHECKING:
    from .manager import Checkpointer, Stateful

REPLICATED = "replicated"
_MIB = 1 << 20
_EXCHANGE_DIR = ".checkpoint-exchange"


@dataclass
class NodeLayout:
    """Where a rank sits among the nodes: torchrun's GROUP_RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, and the node's name.

    The name (see ``node_name``) finds the node's keeper; the group rank may change from one
    rendezvous round to the next, so the keepers keep their own index among the nodes.
    """

    node: int
    nnodes: int
    local_rank: int
    local_world_size: int
    name: str

    @classmethod
    def from_env(cls, rank: int, world_size: int) -> "NodeLayout":
        if "LOCAL_RANK" not in os.environ:
            return cls(node=0, nnodes=1, local_rank=rank, local_world_size=world_size, name=node_name())
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        node = int(os.environ.get("GROUP_RANK", rank // local_world_size))
        return cls(node=node, nnodes=max(1, world_size // local_world_size), local_rank=local_rank,
                   local_world_size=local_world_size, name=node_name())


@dataclass
class SnapshotStats:
    """What snapshots cost the training loop, for logs and benchmarks."""

    snapshots: int = 0
    stall_s: float = 0.0
    """Time the training thread spent in after_step and waiting in wait_before_step / optimizer hooks."""
    wait_s: float = 0.0
    """Part of the stall spent before optimizer steps, on copies the background had not finished."""
    settle_s: float = 0.0
    """Part of the stall spent in after_step until every rank had committed the previous snapshot."""
    backpressure_s: float = 0.0
    """Part of the stall spent waiting for a free slot in the keeper."""


class LazyCheckpointer:
    """The lazy mode of ``Checkpointer``: same calls, snapshots through the node's keeper."""

    def __init__(self, owner: "Checkpointer", layout: NodeLayout) -> None:
        cfg = owner.cfg
        if cfg.memory_interval < 1:
            raise UserError(f"checkpoint.memory_interval must be >= 1, got {cfg.memory_interval}")
        if cfg.interval % cfg.memory_interval:
            raise UserError(
                f"checkpoint.interval={cfg.interval} must be a multiple of checkpoint.memory_interval="
                f"{cfg.memory_interval}: disk checkpoints are written from memory snapshots"
            )
        if cfg.host_buffer_mb < 0:
            raise UserError(f"checkpoint.host_buffer_mb must be >= 0 (0: room for 2 snapshots), got {cfg.host_buffer_mb}")
        if cfg.keeper_idle_s <= 0 or cfg.keeper_timeout_s <= 0:
            raise UserError("checkpoint.keeper_idle_s and checkpoint.keeper_timeout_s must be positive")
        ec = cfg.ec
        if ec.k < 0 or ec.m < 0 or (ec.k == 0) != (ec.m == 0):
            raise UserError(f"checkpoint.ec: k={ec.k}, m={ec.m}: set both positive, or both 0 to disable")
        if ec.library not in ("zfec", "pyeclib"):
            raise UserError(f"checkpoint.ec.library: unknown library {ec.library!r}; choose zfec or pyeclib")
        if ec.k:
            group_of(0, layout.nnodes, ec.k, ec.m)
        self.owner, self.cfg, self.layout = owner, cfg, layout
        self.rank, self.world_size = owner.rank, owner.world_size
        self.stats = SnapshotStats()
        self.keeper: KeeperClient | None = None
        self._copier: Copier | None = None
        self._pending: LazyCopy | None = None
        self._pending_step = 0
        self._pending_persist = False
        self._persisted_step = 0
        """The newest step sent to disk (or restored from a disk checkpoint of it)."""
        self._complete_step = 0
        self._last_step = 0
        self._slot_count = 0
        self._slot_capacity = 0
        self._hooked: set[int] = set()
        self._slot_uids: dict[int, int] = {}
        self._buffers: dict[int, torch.Tensor] = {}
        self._pinned: set[int] = set()

    # ---- restore -------------------------------------------------------------------------------------

    def restore(self, replicated: dict[str, "Stateful"], per_rank: dict[str, "Stateful"]) -> int:
        layout, cfg = self.layout, self.cfg
        self.keeper, hello = KeeperClient.attach(
            self.owner.run_dir, layout.name, layout.local_rank, layout.local_rank == 0, advertised_host(),
            cfg.keeper_idle_s, cfg.keeper_timeout_s, hello=self._run_description(replicated, per_rank))
        report = None
        if layout.local_rank == 0:
            self._warn(self.keeper.call("flush", abandon=True)[0]["errors"])
            report, _ = self.keeper.call("inventory")
            self._warn(report["warnings"])
        mine = {"name": layout.name, "group_rank": layout.node, "local_rank": layout.local_rank,
                "endpoint": [advertised_host(), hello["port"]], "inventory": report}
        nodes = [info for info in self._all_gather(mine, "inventory") if info["local_rank"] == 0]
        indices = _node_indices(nodes)
        reports = {indices[info["name"]]: info["inventory"] for info in nodes}
        if layout.local_rank == 0:
            peers = {str(indices[info["name"]]): info["endpoint"] for info in nodes}
            self.keeper.call("place", index=indices[layout.name], peers=peers)

        decision = self._agree(lambda: self._decide(reports, replicated, per_rank, allow_memory=True), "decision")
        if decision["source"] == "peer":
            rebuilt = True
            if indices[layout.name] in decision["lost"] and layout.local_rank == 0:
                try:
                    self.keeper.call("rebuild", step=decision["step"], lost=decision["lost"])
                except RuntimeError as error:
                    warnings.warn(f"rebuilding node {layout.name}'s snapshot from its peers failed: {error}",
                                  stacklevel=2)
                    rebuilt = False
            if not all(self._all_gather(rebuilt, "rebuilt")):
                decision = self._agree(lambda: self._decide(reports, replicated, per_rank, allow_memory=False),
                                       "fallback")

        step, source = decision["step"], decision["source"]
        if source in ("memory", "peer"):
            self._load_memory(step, replicated, per_rank)
        elif source == "disk":
            # A keeper drops the snapshots of a run with another world size when this one attaches:
            # they hold the old ranks' shards. The disk level reshards (``Checkpointer.load_disk``).
            self.owner.load_disk(Path(decision["path"]), replicated, per_rank,
                                 skipped_memory=cfg.resume.strip() == "auto")
        self.owner.barrier()
        if layout.local_rank == 0:
            self.keeper.call("resume", step=step, source=source, generation=decision["generation"])
        self.owner.barrier()
        self._complete_step = self._last_step = step if source != "none" else 0
        on_disk = source == "disk" or (self.owner.checkpoint_dir / f"step_{step}").is_dir()
        self._persisted_step = step if on_disk else 0
        self.owner.restore_source = None if source == "none" else source
        return step

    def _decide(self, reports: dict[int, dict], replicated: dict, per_rank: dict, allow_memory: bool) -> dict:
        """Rank 0's choice: newest of memory, peer parity and disk (ties go to the cheaper source).

        ``reports`` are the keepers' inventories by node index.
        """
        generation = secrets.token_hex(4)
        mode = self.cfg.resume.strip()
        memory_step, peer_step, lost = (None, None, [])
        if mode == "auto" and allow_memory:
            memory_step, peer_step, lost = self._memory_candidates(reports)
        best = max((s for s in (memory_step, peer_step) if s is not None), default=None)
        if best is not None:
            newest_on_disk = max((_step_of(p) for p in self._disk_candidates()), default=-1)
            if best >= newest_on_disk:
                if memory_step == best:
                    return {"source": "memory", "step": best, "generation": generation}
                return {"source": "peer", "step": best, "lost": lost, "generation": generation}
        path = self.owner.choose_checkpoint(replicated, per_rank)
        if path is None:
            return {"source": "none", "step": 0, "generation": generation}
        step = json.loads((path / "meta.json").read_text())["step"]
        return {"source": "disk", "step": step, "path": str(path), "generation": generation}

    def _memory_candidates(self, nodes: dict[int, dict]) -> tuple[int | None, int | None, list[int]]:
        """(newest step in every node's memory, newest step rebuildable from parity, the nodes to rebuild)."""
        complete = {node: _node_complete(report, self.layout.local_world_size) for node, report in nodes.items()}
        common = set.intersection(*complete.values()) if complete else set()
        memory_step = max(common, default=None)
        ec = self.cfg.ec
        if not ec.k:
            return memory_step, None, []
        for step in sorted(set().union(*complete.values()), reverse=True):
            lost = sorted(node for node in nodes if step not in complete[node])
            if lost and all(self._rebuildable(step, node, complete, nodes) for node in lost):
                return memory_step, step, lost
        return memory_step, None, []

    def _rebuildable(self, step: int, node: int, complete: dict, reports: dict) -> bool:
        group = group_of(node, self.layout.nnodes, self.cfg.ec.k, self.cfg.ec.m)
        lost = {other for other in group.nodes if step not in complete[other]}
        if len(lost) > group.m:
            return False
        for stripe in range(group.n):
            held = 0
            for position, other in enumerate(group.nodes):
                kind, _ = group.block_of(stripe, position)
                if other in lost:
                    continue
                if kind == "data" or [stripe, step] in reports[other]["parity"]:
                    held += 1
            if held < group.k:
                return False
        return True

    def _disk_candidates(self) -> list[Path]:
        candidates = find_checkpoints(self.owner.checkpoint_dir)
        if self.cfg.level3_dir:
            candidates += find_checkpoints(Path(self.cfg.level3_dir))
        return candidates

    def _load_memory(self, step: int, replicated: dict, per_rank: dict) -> None:
        reply, fds = self.keeper.call("map", step=step)
        entries = reply["slots"]
        buffers = []
        for entry, fd in zip(entries, fds, strict=True):
            memory = self.keeper.mapping(entry["uid"], fd, entry["capacity"])
            buffers.append((memoryview(memory)[: entry["nbytes"]], f"memory snapshot of step {step}, local rank "
                                                                   f"{entry['local_rank']} of node {self.layout.name}"))
        if len(buffers) != self.layout.local_world_size:
            raise UserError(f"node {self.layout.name}'s keeper holds step {step} for {len(buffers)} of "
                            f"{self.layout.local_world_size} local ranks")
        _, saved_replicated, held = assemble(buffers)
        del buffers
        _load_states(replicated, saved_replicated)
        own = held.get(self.rank)
        # torchrun may give a node restarted alone another group rank, so the ranks of a node now need
        # not be the ones whose snapshots it holds: then every rank's state travels to where it runs.
        if any(self._all_gather(own is None, "moved")):
            offered = held if self.layout.local_rank == 0 else {}
            own = next((states[self.rank] for states in self._all_gather(offered, "per_rank") if self.rank in states),
                       None)
            if own is None:
                raise UserError(f"no node holds the memory snapshot of rank {self.rank} at step {step}")
        _load_states(per_rank, own)

    # ---- snapshots -----------------------------------------------------------------------------------

    def after_step(self, step: int, replicated: dict, per_rank: dict, force: bool) -> bool:
        cfg = self.cfg
        to_disk = force or (cfg.interval > 0 and step % cfg.interval == 0)
        due = to_disk or step % cfg.memory_interval == 0
        if not due or step < 1 or step == self._last_step:
            return False
        if self.keeper is None:
            raise RuntimeError("call restore() before after_step(): it attaches to the node's keeper")
        started = time.perf_counter()
        self._hook_optimizers(replicated)
        self._settle_pending()
        self.stats.settle_s += time.perf_counter() - started

        flat = {REPLICATED: flatten({name: obj.state_dict() for name, obj in replicated.items()}, REPLICATED),
                "per_rank": flatten({name: obj.state_dict() for name, obj in per_rank.items()}, "per_rank")}
        owners = shard_of(flat[REPLICATED][1], self.layout.local_world_size)
        held = {REPLICATED: [owner == self.layout.local_rank for owner in owners],
                "per_rank": [True] * len(flat["per_rank"][1])}
        identity = {"rank": self.rank, "world_size": self.world_size, "node": self.layout.name,
                    "local_rank": self.layout.local_rank}
        plan = plan_snapshot(step, identity, flat, held)
        self._size_slots(plan.nbytes)
        waited = time.perf_counter()
        reply, fds = self.keeper.call("acquire", local_rank=self.layout.local_rank, step=step, nbytes=plan.nbytes,
                                      keep=[self._complete_step], count=self._slot_count,
                                      capacity=self._slot_capacity)
        self.stats.backpressure_s += time.perf_counter() - waited
        for error in reply["disk_errors"]:
            warnings.warn(f"lazy checkpointing: {error}; training goes on, the previous disk checkpoint and "
                          "latest are kept, the next disk save tries again", stacklevel=3)
        buffer = self._slot_buffer(reply["slot"], reply["uid"], fds[0], reply["capacity"],
                                   pin=any(source.is_cuda for source, _ in plan.copies))
        buffer[: len(plan.prefix)] = torch.frombuffer(bytearray(plan.prefix), dtype=torch.uint8)

        stable = _stable_storages(replicated, per_rank)
        lazy = []
        for source, offset in plan.copies:
            destination = buffer[offset : offset + source.nbytes].view(source.dtype).view(source.shape)
            if source.untyped_storage().data_ptr() in stable:
                lazy.append((source, destination))
            else:
                destination.copy_(source)  # may change before the next optimizer step: copy now
        slot, nbytes, local_rank = reply["slot"], plan.nbytes, self.layout.local_rank

        def commit() -> None:
            self.keeper.tell("commit", local_rank=local_rank, slot=slot, step=step, nbytes=nbytes)

        if self._copier is None:
            self._copier = Copier()
        self._pending = self._copier.submit(LazyCopy(lazy, commit))
        self._pending_step, self._pending_persist, self._last_step = step, to_disk, step
        self.stats.snapshots += 1
        self.stats.stall_s += time.perf_counter() - started
        if force:
            self.flush()
        return True

    def save_now(self, step: int, replicated: dict, per_rank: dict) -> None:
        """Put ``step`` on disk and wait: a new snapshot, or the memory snapshot of ``step`` already taken."""
        if step < 1:
            return
        if step != self._last_step:
            self.after_step(step, replicated, per_rank, force=True)
            return
        self._settle_pending()
        if step != self._persisted_step:
            if self.layout.local_rank == 0:
                self.keeper.tell("complete", step=step, persist=True)
            self._persisted_step = step
        self.flush()

    def wait_before_step(self) -> None:
        if self._pending is not None:
            started = time.perf_counter()
            self._pending.wait()
            self.stats.wait_s += time.perf_counter() - started
            self.stats.stall_s += time.perf_counter() - started

    def flush(self) -> None:
        """Finish the snapshot in flight and every disk save it and its predecessors started."""
        self._settle_pending()
        if self.layout.local_rank == 0:
            errors = self.keeper.call("flush")[0]["errors"]
            if errors:
                raise CheckpointError("; ".join(errors))
        self.owner.barrier()

    def save_final(self, model_state: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path | None:
        if self._pending is not None:
            self.flush()
        path = write_final_weights(model_state, self.owner.final_dir, metadata) if self.rank == 0 else None
        self.owner.barrier()
        self.close(shutdown_keeper=True)
        return path

    def close(self, shutdown_keeper: bool = False) -> None:
        """Finish the snapshot in flight, release the keeper (telling it the run is over, if ``shutdown_keeper``).

        Every rank must call it, as it synchronises them once more.
        """
        if self._pending is not None:
            self._settle_pending()
        if self._copier is not None:
            self._copier.close()
            self._copier = None
        if self.keeper is not None:
            if shutdown_keeper and self.layout.local_rank == 0:
                self.keeper.call("shutdown")
            for uid in self._pinned:
                unpin_host_memory(self._buffers[uid])
            self._pinned.clear()
            self._buffers.clear()
            self.keeper.close()
            self.keeper = None

    def _settle_pending(self) -> None:
        """Wait until the snapshot in flight is committed by every rank; hand it to the keeper's levels."""
        if self._pending is None:
            return
        self._pending.wait_complete()
        self.owner.barrier()
        if self.layout.local_rank == 0:
            self.keeper.tell("complete", step=self._pending_step, persist=self._pending_persist)
        self._complete_step = self._pending_step
        if self._pending_persist:
            self._persisted_step = self._pending_step
        self._pending = None

    def _slot_buffer(self, slot: int, uid: int, fd: int, capacity: int, pin: bool) -> torch.Tensor:
        """The slot's shared memory as bytes, mapped once; page-locked for CUDA copies. A slot the
        keeper replaced (to grow it) is unmapped."""
        replaced = self._slot_uids.get(slot)
        if replaced is not None and replaced != uid:
            old = self._buffers.pop(replaced)
            if replaced in self._pinned:
                unpin_host_memory(old)
                self._pinned.discard(replaced)
            del old
            self.keeper.release(replaced)
        self._slot_uids[slot] = uid
        if uid not in self._buffers:
            self._buffers[uid] = torch.frombuffer(self.keeper.mapping(uid, fd, capacity), dtype=torch.uint8)
        else:
            os.close(fd)
        if pin and uid not in self._pinned:
            pin_host_memory(self._buffers[uid])
            self._pinned.add(uid)
        return self._buffers[uid]

    def _size_slots(self, nbytes: int) -> None:
        """Fix the slot size at the first snapshot (5% headroom, whole MiB), growing it if the state grows."""
        if nbytes <= self._slot_capacity:
            return
        capacity = -(-int(nbytes * 1.05) // _MIB) * _MIB
        if self.cfg.host_buffer_mb:
            count = self.cfg.host_buffer_mb * _MIB // capacity
            if count < 2:
                raise UserError(
                    f"checkpoint.host_buffer_mb={self.cfg.host_buffer_mb} holds fewer than 2 snapshots of rank "
                    f"{self.rank} ({nbytes / _MIB:.1f} MiB each); set at least {2 * capacity // _MIB}, or 0 to size "
                    "it automatically"
                )
        else:
            count = 3 if self.cfg.ec.k else 2
        self._slot_count, self._slot_capacity = count, capacity

    def _hook_optimizers(self, replicated: dict) -> None:
        """Make each optimizer wait for the copies of its own tensors before it steps (per-layer updates too)."""
        for obj in replicated.values():
            if not isinstance(obj, torch.optim.Optimizer):
                continue
            inner = getattr(obj, "inner", None)
            optimizers = list(inner.values()) if isinstance(inner, dict) and inner else [obj]
            for optimizer in optimizers:
                if id(optimizer) in self._hooked:
                    continue
                self._hooked.add(id(optimizer))
                optimizer.register_step_pre_hook(self._optimizer_pre_hook)

    def _optimizer_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        pending = self._pending
        if pending is None or pending.complete:
            return
        started = time.perf_counter()
        pending.wait(_optimizer_tensors(optimizer))
        self.stats.wait_s += time.perf_counter() - started
        self.stats.stall_s += time.perf_counter() - started

    # ---- coordination --------------------------------------------------------------------------------

    def _run_description(self, replicated: dict, per_rank: dict) -> dict:
        """What the keeper needs to know of this run: identity, where and how to write levels 2 and 3."""
        owner = self.owner
        meta = {"fingerprint": owner.fingerprint, "world_size": self.world_size, REPLICATED: sorted(replicated),
                "per_rank": sorted(per_rank)}
        expected = [REPLICATED] + ([f"rank_{r}" for r in range(self.world_size)] if per_rank else [])
        return {
            "fingerprint": json.dumps(owner.fingerprint, sort_keys=True), "world_size": self.world_size,
            "local_world_size": self.layout.local_world_size, "nnodes": self.layout.nnodes, "meta": meta,
            "expected": expected, "directory": str(owner.checkpoint_dir.resolve()), "keep": self.cfg.keep,
            "level3_dir": str(Path(self.cfg.level3_dir).resolve()) if self.cfg.level3_dir else "",
            "ec": {"k": self.cfg.ec.k, "m": self.cfg.ec.m, "library": self.cfg.ec.library}, "generation": "initial",
        }

    def _agree(self, decide, tag: str) -> dict:
        """Rank 0 decides; every rank gets the decision, or raises rank 0's error."""
        decision: dict[str, Any] = {}
        if self.rank == 0:
            try:
                decision = decide()
            except UserError as error:
                decision = {"error": str(error), "type": type(error).__name__}
        decision = self._all_gather(decision if self.rank == 0 else None, tag)[0]
        if "error" in decision:
            raise (CheckpointError if decision["type"] == "CheckpointError" else UserError)(decision["error"])
        return decision

    def _all_gather(self, value: Any, tag: str) -> list[Any]:
        """Every rank's ``value`` (state: tensors and plain containers), through torch.distributed or,
        without a process group, files in the run directory."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, value)
            return gathered
        exchange = self.owner.run_dir / _EXCHANGE_DIR / tag
        exchange.mkdir(parents=True, exist_ok=True)
        mine = exchange / f"{self.rank}.pt"
        torch.save(value, exchange / f".{self.rank}.tmp")
        os.replace(exchange / f".{self.rank}.tmp", mine)
        self.owner.barrier()
        gathered = [torch.load(exchange / f"{r}.pt", weights_only=True) for r in range(self.world_size)]
        self.owner.barrier()
        mine.unlink()
        return gathered

    @staticmethod
    def _warn(messages: list[str]) -> None:
        for message in messages:
            warnings.warn(message, stacklevel=3)


def _node_indices(nodes: list[dict]) -> dict[str, int]:
    """Each node's index: the one its keeper holds data under, else a free one, in group-rank order.

    Indices place nodes in erasure-coding groups and pick who writes the replicated state; they must
    outlive torchrun's group ranks, which a node restarted alone may not get back.
    """
    count = len(nodes)
    ordered = sorted(nodes, key=lambda info: info["group_rank"])
    indices: dict[str, int] = {}
    for info in ordered:
        held = info["inventory"]["index"]
        if held is not None and 0 <= held < count and held not in indices.values():
            indices[info["name"]] = held
    free = sorted(set(range(count)) - set(indices.values()), reverse=True)
    for info in ordered:
        if info["name"] not in indices and free:
            indices[info["name"]] = free.pop()
    if len(indices) != count:
        names = sorted(info["name"] for info in nodes)
        raise UserError(f"two nodes share a name ({names}): set LEANTRAIN_NODE_NAME to tell apart agents on one machine")
    return indices


def _node_complete(report: dict, local_world_size: int) -> set[int]:
    """Steps that every local rank of a node holds."""
    per_rank = [set(report["snapshots"].get(str(r), [])) for r in range(local_world_size)]
    return set.intersection(*per_rank) if per_rank else set()


def _stable_storages(replicated: dict, per_rank: dict) -> set[int]:
    """Storages that only an optimizer step changes: parameters and optimizer state (copied lazily)."""
    stable = set()
    for obj in [*replicated.values(), *per_rank.values()]:
        if isinstance(obj, torch.nn.Module):
            stable.update(p.untyped_storage().data_ptr() for p in obj.parameters())
        elif isinstance(obj, torch.optim.Optimizer):
            inner = getattr(obj, "inner", None)
            for optimizer in list(inner.values()) if isinstance(inner, dict) and inner else [obj]:
                stable.update(t.untyped_storage().data_ptr() for t in _optimizer_tensors(optimizer))
    return stable


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    for state in optimizer.state.values():
        tensors.extend(value for value in state.values() if isinstance(value, torch.Tensor))
    return tensors


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])
