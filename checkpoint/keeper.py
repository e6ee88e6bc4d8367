"""The keeper: one process per node that owns its trainers' snapshots and outlives them (REFT's SMP).

Trainers copy their snapshots into slots of shared memory that the keeper created (memfd: anonymous
memory, handed over a Unix socket, freed when the keeper and its trainers are gone, so nothing can
leak into /dev/shm). A trainer that crashes and is restarted by ``torchrun --max-restarts``
re-attaches and restores from its node's memory. Everything slow happens here, off the training
path: checksums of committed snapshots, erasure coding with the other keepers of the node's group
(keeper_parity.py), streaming snapshots to disk (level 2, levels.py) and copying disk checkpoints
to a second directory (level 3). The keeper exits when its run tells it to, or after ``idle_s``
seconds without a trainer attached.

Slots: each local rank has a few; a slot is reusable unless it is being written or hashed, holds
a step that the trainers still need (the newest step every rank has committed), the step whose
parity currently protects the node, or a step pinned by a disk save or an erasure-coding round. A
trainer asking for a slot when none is reusable waits (backpressure).
"""

import argparse
import contextlib
import hashlib
import json
import logging
import mmap
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import wire
from .disk import write_text_atomic
from .keeper_parity import GroupParity
from .lazy import yield_cores_to_training
from .snapshot import digest

KEEPER_DIR = "keepers"
log = logging.getLogger("leantrain.keeper")


def socket_name(run_dir: Path, name: str) -> str:
    """The abstract Unix socket of a node's keeper: one per (run directory, node name)."""
    key = hashlib.sha256(f"{Path(run_dir).resolve()}\0{name}".encode()).hexdigest()[:32]
    return f"\0leantrain-keeper-{key}"


def record_path(run_dir: Path, name: str) -> Path:
    """Where a keeper writes its pid and endpoints while it runs."""
    return Path(run_dir) / KEEPER_DIR / f"{name}.json"


@dataclass
class Slot:
    """One region of shared memory holding at most one snapshot of one local rank."""

    uid: int
    fd: int
    capacity: int
    memory: mmap.mmap
    step: int | None = None
    nbytes: int = 0
    digest: str | None = None
    writing: bool = False
    hashing: bool = False

    def checksum(self, nbytes: int | None = None) -> str:
        """Digest of the first ``nbytes`` (default: the snapshot's), read in place."""
        with memoryview(self.memory) as view:
            return digest(view[: self.nbytes if nbytes is None else nbytes])

    def close(self) -> None:
        try:
            self.memory.close()
        except BufferError:  # something still reads the old bytes; the mapping goes when it is done
            pass
        os.close(self.fd)


class Keeper:
    """The state and threads of one node's keeper; ``serve`` runs it."""

    def __init__(self, run_dir: Path, name: str, host: str, idle_s: float, timeout_s: float) -> None:
        self.run_dir, self.name, self.host = Path(run_dir), name, host
        self.index: int | None = None
        """This node's place among the run's nodes (for erasure coding and disk roles), fixed at the
        first restore it takes part in and kept across restarts, whatever rank torchrun gives it."""
        self.idle_s, self.timeout_s = idle_s, timeout_s
        self.lock = threading.Condition()
        self.slots: dict[int, list[Slot]] = {}
        self.run: dict[str, Any] | None = None
        self.peers: dict[int, tuple[str, int]] = {}
        self.global_step = 0
        """The newest step every rank has committed, as the trainers said."""
        self.pins: Counter[int] = Counter()
        """Steps whose slots must not be reused yet (disk saves, erasure-coding rounds), with counts."""
        self.ec = GroupParity(self)
        self.disk_queue: deque[int] = deque()
        self.abandon_commits = threading.Event()
        self.disk_busy = False
        self.disk_errors: list[str] = []
        self.level3_step: int | None = None
        self.level3_busy = False
        self.clients = 0
        self.idle_since = time.monotonic()
        self.stopping = False
        self._uids = 0
        self._hash_queue: deque[Slot] = deque()

    # ---- lifecycle -------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Bind both sockets (the Unix one doubles as a lock: a second keeper exits), run until told or idle."""
        trainers = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            trainers.bind(socket_name(self.run_dir, self.name))
        except OSError:
            log.info("another keeper already serves node %s of %s; exiting", self.name, self.run_dir)
            return
        trainers.listen(64)
        self._trainer_server = trainers
        peers = socket.create_server((self.host, 0))
        self.port = peers.getsockname()[1]
        record = record_path(self.run_dir, self.name)
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps({"pid": os.getpid(), "host": self.host, "port": self.port}))
        log.info("keeper of node %s serving %s on %s:%d", self.name, self.run_dir, self.host, self.port)
        for target in (self._hash_loop, self._disk_loop, self._level3_loop, self.ec.lead):
            threading.Thread(target=target, daemon=True).start()
        threading.Thread(target=self._accept, args=(trainers, self._serve_trainer), daemon=True).start()
        threading.Thread(target=self._accept, args=(peers, self.ec.serve), daemon=True).start()
        try:
            with self.lock:
                while not self._should_exit():
                    self.lock.wait(0.5)
        finally:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(record.read_text())["pid"] == os.getpid():  # not a successor's record
                    record.unlink()
            log.info("keeper of node %s exits", self.name)

    def _should_exit(self) -> bool:
        busy = self.disk_busy or self.disk_queue or self.level3_busy or self.level3_step is not None
        idle = self.clients == 0 and time.monotonic() - self.idle_since > self.idle_s
        return not busy and (self.stopping or idle)

    def _accept(self, server: socket.socket, handler) -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed by shutdown
                return
            threading.Thread(target=handler, args=(connection,), daemon=True).start()

    # ---- trainers --------------------------------------------------------------------------------------

    def _serve_trainer(self, connection: socket.socket) -> None:
        local_rank = None
        with self.lock:
            self.clients += 1
        try:
            while True:
                header, payload, _ = wire.receive(connection)
                op = header["op"]
                if op == "hello":
                    local_rank = header["local_rank"]
                try:
                    reply, fds = getattr(self, f"_trainer_{op}")(header)
                except Exception as error:  # noqa: BLE001 - reported to the trainer
                    log.exception("request %s failed", op)
                    reply, fds = {"error": f"keeper of node {self.name}: {op} failed: {error}"}, []
                if reply is not None:
                    wire.send(connection, reply, fds=fds)
        except (wire.PeerGone, OSError):
            pass
        finally:
            connection.close()
            with self.lock:
                self.clients -= 1
                self.idle_since = time.monotonic()
                for slot in self.slots.get(local_rank, []):
                    if slot.writing:  # its trainer died while copying into it
                        slot.writing, slot.step = False, None
                self.lock.notify_all()

    def _trainer_hello(self, header: dict) -> tuple[dict, list]:
        run = header["run"]
        identity = ("fingerprint", "world_size", "local_world_size", "nnodes", "meta")
        with self.lock:
            if self.run is not None and any(self.run[key] != run[key] for key in identity):
                log.warning("a run with another configuration attached; dropping the snapshots held so far")
                self._drop_all()
            self.run = run
        return {"port": self.port, "pid": os.getpid()}, []

    def _trainer_acquire(self, header: dict) -> tuple[dict, list]:
        """A slot for ``step`` of ``local_rank``: a new one while fewer than ``count``, else a reusable one."""
        local_rank, nbytes, keep = header["local_rank"], header["nbytes"], set(header["keep"])
        count, capacity = header["count"], max(header["capacity"], header["nbytes"])
        started = time.monotonic()
        with self.lock:
            slots = self.slots.setdefault(local_rank, [])
            while True:
                if len(slots) < count:
                    slot = self._new_slot(capacity)
                    slots.append(slot)
                    break
                free = [s for s in slots if self._reusable(s, keep)]
                if free:  # the oldest, keeping the next erasure-coding candidate if there is a choice
                    slot = min(free, key=lambda s: (s.step is not None and s.step == self.ec.candidate,
                                                    -1 if s.step is None else s.step))
                    break
                if time.monotonic() - started > self.timeout_s * 10:
                    raise TimeoutError(f"no snapshot slot of local rank {local_rank} became free")
                self.lock.wait(1.0)
            if slot.capacity < nbytes:
                replacement = self._new_slot(capacity)
                slots[slots.index(slot)] = replacement
                slot.close()
                slot = replacement
            slot.writing, slot.step, slot.digest, slot.nbytes = True, None, None, 0
            index = slots.index(slot)
            errors = []
            if local_rank == 0:  # failed disk saves, reported once, as a warning, with the next snapshot
                errors, self.disk_errors = self.disk_errors, []
        waited = time.monotonic() - started
        reply = {"slot": index, "uid": slot.uid, "capacity": slot.capacity, "waited_s": waited, "disk_errors": errors}
        return reply, [slot.fd]

    def _trainer_commit(self, header: dict) -> tuple[None, list]:
        with self.lock:
            slot = self.slots[header["local_rank"]][header["slot"]]
            slot.writing, slot.step, slot.nbytes, slot.hashing = False, header["step"], header["nbytes"], True
            self._hash_queue.append(slot)
            self.lock.notify_all()
        return None, []

    def _trainer_complete(self, header: dict) -> tuple[None, list]:
        """Every rank has committed ``step``; save it to disk too if ``persist``."""
        step = header["step"]
        with self.lock:
            self.global_step = max(self.global_step, step)
            self.ec.candidate = self.global_step
            if header.get("persist") and step not in self.disk_queue:
                self.disk_queue.append(step)
                self.pins[step] += 1
            self.lock.notify_all()
        return None, []

    def _trainer_inventory(self, header: dict) -> tuple[dict, list]:
        """Verified snapshots held (a damaged one is dropped with a warning), parity held, protected step."""
        warnings = []
        with self.lock:
            while any(slot.hashing for slots in self.slots.values() for slot in slots):
                self.lock.wait(1.0)
            for local_rank, slots in self.slots.items():
                for index, slot in enumerate(slots):
                    if slot.step is None or slot.writing:
                        continue
                    if slot.digest is None or slot.checksum() != slot.digest:
                        warnings.append(
                            f"skipping the memory snapshot of step {slot.step} of local rank {local_rank} "
                            f"(slot {index} of the keeper of node {self.name}): its checksum does not match"
                        )
                        slot.step = None
            snapshots = {
                str(local_rank): sorted({s.step for s in slots if s.step is not None and not s.writing})
                for local_rank, slots in self.slots.items()
            }
            parity, protected = self.ec.held(), self.ec.protected
        for message in warnings:
            log.warning(message)
        report = {"index": self.index, "snapshots": snapshots, "parity": parity, "protected": protected,
                  "warnings": warnings}
        return report, []

    def _trainer_map(self, header: dict) -> tuple[dict, list]:
        """The slots holding ``step`` for every local rank, with their file descriptors."""
        step = header["step"]
        entries, fds = [], []
        with self.lock:
            for local_rank in sorted(self.slots):
                for index, slot in enumerate(self.slots[local_rank]):
                    if slot.step == step and not slot.writing and not slot.hashing:
                        entries.append({"local_rank": local_rank, "slot": index, "uid": slot.uid,
                                        "nbytes": slot.nbytes, "capacity": slot.capacity})
                        fds.append(slot.fd)
                        break
        return {"slots": entries}, fds

    def _trainer_resume(self, header: dict) -> tuple[dict, list]:
        """The run restarts at ``step`` from ``source``: forget what is newer, or everything after a disk load."""
        step, source = header["step"], header["source"]
        with self.lock:
            self.run["generation"] = header["generation"]
            keep_memory = source in ("memory", "peer")
            for slots in self.slots.values():
                for slot in slots:
                    if slot.step is not None and (not keep_memory or slot.step > step):
                        slot.step, slot.digest = None, None
            self.ec.reset(step, keep_memory)
            self.global_step = step if keep_memory else 0
            self.lock.notify_all()
        return {"ok": True}, []

    def _trainer_flush(self, header: dict) -> tuple[dict, list]:
        """Wait until every queued disk save (and its level-3 copy) is done; report their errors.

        With ``abandon`` (a restart), a commit still waiting for other nodes' payloads gives up: they
        may never come, and the staging directory is left for the restore's repair to remove.
        """
        if header.get("abandon"):
            self.abandon_commits.set()
        with self.lock:
            while self.disk_queue or self.disk_busy or self.level3_busy or self.level3_step is not None:
                self.lock.wait(1.0)
            errors, self.disk_errors = self.disk_errors, []
        self.abandon_commits.clear()
        return {"errors": errors}, []

    def _trainer_place(self, header: dict) -> tuple[dict, list]:
        """This node's index among the run's nodes, and every node's keeper endpoint by index.

        A keeper given another index than the one it held its snapshots and parity under drops them:
        they were encoded for another place in the group.
        """
        with self.lock:
            if self.index is not None and self.index != header["index"]:
                log.warning("node %s moves from index %d to %d; dropping what it held", self.name, self.index,
                            header["index"])
                self._drop_all()
            self.index = header["index"]
            self.peers = {int(index): tuple(endpoint) for index, endpoint in header["peers"].items()}
            self.lock.notify_all()
        return {"ok": True}, []

    def _trainer_rebuild(self, header: dict) -> tuple[dict, list]:
        """This node lost its memory: rebuild its snapshots of ``step`` from the group's parity."""
        step = header["step"]
        snapshots = self.ec.rebuild(step, set(header["lost"]))
        with self.lock:
            for local_rank, data, value in snapshots:
                slot = self._new_slot(max(len(data), 64))
                slot.memory[: len(data)] = data
                slot.step, slot.nbytes, slot.digest = step, len(data), value
                self.slots.setdefault(local_rank, []).append(slot)
            self.lock.notify_all()
        return {"ok": True}, []

    def _trainer_shutdown(self, header: dict) -> tuple[dict, list]:
        """The run is over: stop taking trainers at once (a new run gets a new keeper), exit when idle."""
        with self.lock:
            self.stopping = True
            self._trainer_server.shutdown(socket.SHUT_RDWR)  # wakes accept() and frees the name now
            self._trainer_server.close()
            self.lock.notify_all()
        return {"ok": True}, []

    # ---- state helpers (called with the lock held) ----------------------------------------------------

    def _new_slot(self, capacity: int) -> Slot:
        fd = os.memfd_create(f"leantrain-snapshot-{self.name}", os.MFD_CLOEXEC)
        os.ftruncate(fd, capacity)
        self._uids += 1
        return Slot(uid=self._uids, fd=fd, capacity=capacity, memory=mmap.mmap(fd, capacity))

    def _reusable(self, slot: Slot, keep: set[int]) -> bool:
        if slot.writing or slot.hashing:
            return False
        return slot.step is None or (slot.step not in keep and not self.pins[slot.step] and slot.step != self.ec.protected)

    def node_slots(self, step: int) -> list[Slot] | None:
        """This node's committed, hashed slots of ``step`` in local-rank order, or None if any rank lacks it."""
        found = []
        for local_rank in range(self.run["local_world_size"]):
            slot = next((s for s in self.slots.get(local_rank, []) if s.step == step and s.digest and not s.hashing), None)
            if slot is None:
                return None
            found.append(slot)
        return found

    def passed(self, step: int) -> bool:
        """True when every local rank has committed a snapshot newer than ``step``."""
        newest = [max((s.step for s in self.slots.get(r, []) if s.step is not None), default=-1)
                  for r in range(self.run["local_world_size"])]
        return min(newest) > step

    def unpin(self, step: int) -> None:
        with self.lock:
            self.pins[step] -= 1
            self.lock.notify_all()

    def _drop_all(self) -> None:
        for slots in self.slots.values():
            for slot in slots:
                slot.close()
        self.slots.clear()
        self.ec.reset(0, keep_memory=False)
        self.global_step = 0

    # ---- background work ------------------------------------------------------------------------------

    def _hash_loop(self) -> None:
        yield_cores_to_training()  # the node's trainers share these cores
        while True:
            with self.lock:
                while not self._hash_queue:
                    self.lock.wait()
                slot = self._hash_queue.popleft()
                step, nbytes = slot.step, slot.nbytes
            value = slot.checksum(nbytes)
            with self.lock:
                if slot.step == step:
                    slot.digest = value
                slot.hashing = False
                self.lock.notify_all()

    def _disk_loop(self) -> None:
        from .levels import commit_when_complete, discard_staging, write_node_payloads

        yield_cores_to_training()
        while True:
            with self.lock:
                while not self.disk_queue:
                    self.lock.wait()
                step = self.disk_queue[0]
                self.disk_busy = True
                deadline = time.monotonic() + self.timeout_s
                while (slots := self.node_slots(step)) is None and time.monotonic() < deadline:
                    self.lock.wait(0.5)
                run = dict(self.run)
            pinned = True
            try:
                if slots is None:
                    raise RuntimeError(f"the snapshot of step {step} is not complete in memory")
                directory = Path(run["directory"])
                buffers = [(memoryview(slot.memory)[: slot.nbytes], f"node {self.name} local rank {i}")
                           for i, slot in enumerate(slots)]
                write_node_payloads(directory, step, run["generation"], buffers, write_replicated=self.index == 0)
                del buffers
                self.unpin(step)
                pinned = False
                if self.index == 0:
                    commit_when_complete(directory, step, run["generation"], run["meta"], run["expected"],
                                         run["keep"], self.timeout_s, self.abandon_commits)
                    with self.lock:
                        if run.get("level3_dir"):
                            self.level3_step = step
                        self.lock.notify_all()
            except Exception as error:  # noqa: BLE001 - reported by the next flush
                log.exception("saving step %d to disk failed", step)
                discard_staging(Path(run["directory"]), step, run["generation"])  # a full disk needs the space
                with self.lock:
                    self.disk_errors.append(f"disk checkpoint of step {step}: {error}")
                if pinned:
                    self.unpin(step)
            with self.lock:
                self.disk_queue.popleft()
                self.disk_busy = False
                self.lock.notify_all()

    def _level3_loop(self) -> None:
        from .levels import copy_checkpoint

        while True:
            with self.lock:
                while self.level3_step is None:
                    self.lock.wait()
                step, self.level3_step, self.level3_busy = self.level3_step, None, True
                run = dict(self.run)
            try:
                copy_checkpoint(Path(run["directory"]) / f"step_{step}", Path(run["level3_dir"]), run["keep"])
            except Exception as error:  # noqa: BLE001
                log.exception("copying step %d to level 3 failed", step)
                with self.lock:
                    self.disk_errors.append(f"level-3 copy of step {step}: {error}")
            with self.lock:
                self.level3_busy = False
                self.lock.notify_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="leantrain's per-node snapshot keeper")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--name", required=True, help="the node's name (its host name, or LEANTRAIN_NODE_NAME)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--idle-s", type=float, default=300.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--detach", action="store_true", help="fork, so that no trainer is this process's parent")
    args = parser.parse_args(argv)
    if args.detach and os.fork() > 0:
        os._exit(0)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s keeper %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Keeper(Path(args.run_dir), args.name, args.host, args.idle_s, args.timeout_s).serve()


if __name__ == "__main__":
    main()
