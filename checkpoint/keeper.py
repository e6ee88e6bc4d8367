"""The keeper: one process per node that owns its trainers' snapshots and outlives them (REFT's SMP).

Trainers copy their snapshots into slots of shared memory that the keeper created (memfd: anonymous
memory, handed over a Unix socket, freed when the keeper and its trainers are gone, so nothing can
leak into /dev/shm). A trainer that crashes and is restarted by ``torchrun --max-restarts``
re-attaches and restores from its node's memory. Everything slow happens here, off the training
path: checksums of committed snapshots, erasure coding with the other keepers of the node's group
(parity.py), streaming snapshots to disk (level 2, levels.py) and copying disk checkpoints to a
second directory (level 3). The keeper exits when its run tells it to, or after ``idle_s`` seconds
without a trainer attached.

Slots: each local rank has a few; a slot is reusable unless it is being written or hashed, holds
a step that the trainers still need (the newest step every rank has committed), the step whose
parity currently protects the node (``protected``), or a step pinned by a disk save or an
erasure-coding round. A trainer asking for a slot when none is reusable waits (backpressure).

Erasure-coding rounds are run by the first node of each group: it picks the newest step every rank
has committed, every member pins it and sends its fragments to the stripes' gatherers, which encode
and hand the parity blocks to their holders; once every block is stored the round is done, the
step becomes ``protected`` and older parity is dropped. A failed round is aborted and retried.
"""

import argparse
import base64
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire
from .disk import write_text_atomic
from .erasure import make_codec
from .parity import Group, decode_stripe, encode_stripe, fragment_length, group_of, join_fragments
from .snapshot import digest

KEEPER_DIR = "keepers"
log = logging.getLogger("leantrain.keeper")


def socket_name(run_dir: Path, node: int) -> str:
    """The abstract Unix socket of a node's keeper: one per (run directory, node)."""
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:24]
    return f"\0leantrain-keeper-{key}-{node}"


def record_path(run_dir: Path, node: int) -> Path:
    """Where a keeper writes its pid and endpoints while it runs."""
    return Path(run_dir) / KEEPER_DIR / f"node_{node}.json"


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

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)


@dataclass
class ParityRecord:
    """One parity block of one stripe, from one erasure-coding round."""

    step: int
    stripe: int
    index: int
    block: bytes
    lengths: list[int]
    meta: bytes
    manifests: list[dict]


@dataclass
class Round:
    step: int
    acks: set = field(default_factory=set)


class Keeper:
    def __init__(self, run_dir: Path, node: int, host: str, idle_s: float, timeout_s: float) -> None:
        self.run_dir, self.node, self.host = Path(run_dir), node, host
        self.idle_s, self.timeout_s = idle_s, timeout_s
        self.lock = threading.Condition()
        self.slots: dict[int, list[Slot]] = {}
        self.run: dict[str, Any] | None = None
        self.peers: dict[int, tuple[str, int]] = {}
        self.global_step = 0
        self.candidate: int | None = None
        """The step the next erasure-coding round will likely ask for: its slot is reused last."""
        self.pins: Counter[int] = Counter()
        self.protected: int | None = None
        self.protected_round: int | None = None
        self.parity: dict[tuple[int, int], ParityRecord] = {}
        self.round_pins: dict[int, int] = {}
        self.gathering: dict[tuple[int, int], dict[int, tuple[bytes, dict]]] = {}
        self.rounds: dict[int, Round] = {}
        self.last_round_step = 0
        self._last_round_error = ""
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
            trainers.bind(socket_name(self.run_dir, self.node))
        except OSError:
            log.info("another keeper already serves node %d of %s; exiting", self.node, self.run_dir)
            return
        trainers.listen(64)
        peers = socket.create_server((self.host, 0))
        self.port = peers.getsockname()[1]
        record = record_path(self.run_dir, self.node)
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps({"pid": os.getpid(), "host": self.host, "port": self.port}))
        log.info("keeper of node %d serving %s on %s:%d", self.node, self.run_dir, self.host, self.port)
        for target in (self._hash_loop, self._disk_loop, self._level3_loop, self._leader_loop):
            threading.Thread(target=target, daemon=True).start()
        threading.Thread(target=self._accept, args=(trainers, self._serve_trainer), daemon=True).start()
        threading.Thread(target=self._accept, args=(peers, self._serve_peer), daemon=True).start()
        try:
            with self.lock:
                while not self._should_exit():
                    self.lock.wait(0.5)
        finally:
            record.unlink(missing_ok=True)
            log.info("keeper of node %d exits", self.node)

    def _should_exit(self) -> bool:
        busy = self.disk_busy or self.disk_queue or self.level3_busy or self.level3_step is not None
        idle = self.clients == 0 and time.monotonic() - self.idle_since > self.idle_s
        return not busy and (self.stopping or idle)

    def _accept(self, server: socket.socket, handler) -> None:
        while True:
            connection, _ = server.accept()
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
                    reply, fds = {"error": f"keeper of node {self.node}: {op} failed: {error}"}, []
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
            self.stopping = False
            if self.run is not None and any(self.run[key] != run[key] for key in identity):
                log.warning("a run with another configuration attached; dropping the snapshots held so far")
                self._drop_all()
            self.run = run
            self.peers = {int(node): tuple(endpoint) for node, endpoint in run.get("peers", {}).items()}
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
                    slot = min(free, key=lambda s: (s.step is not None and s.step == self.candidate,
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
        waited = time.monotonic() - started
        return {"slot": index, "uid": slot.uid, "capacity": slot.capacity, "waited_s": waited}, [slot.fd]

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
            self.candidate = self.global_step
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
                    if slot.digest is None or digest(slot.memory[: slot.nbytes]) != slot.digest:
                        warnings.append(
                            f"skipping the memory snapshot of step {slot.step} of local rank {local_rank} "
                            f"(slot {index} of the keeper of node {self.node}): its checksum does not match"
                        )
                        slot.step = None
            snapshots = {
                str(local_rank): sorted({s.step for s in slots if s.step is not None and not s.writing})
                for local_rank, slots in self.slots.items()
            }
            parity = sorted({(r.stripe, r.step) for (_, rnd), r in self.parity.items() if rnd == self.protected_round})
        for message in warnings:
            log.warning(message)
        return {"snapshots": snapshots, "parity": parity, "protected": self.protected, "warnings": warnings}, []

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
            if not keep_memory or (self.protected is not None and self.protected > step):
                self.parity.clear()
                self.protected = self.protected_round = None
            self.global_step = step if keep_memory else 0
            self.last_round_step = 0
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

    def _trainer_peers(self, header: dict) -> tuple[dict, list]:
        with self.lock:
            self.peers = {int(node): tuple(endpoint) for node, endpoint in header["peers"].items()}
            self.lock.notify_all()
        return {"ok": True}, []

    def _trainer_rebuild(self, header: dict) -> tuple[dict, list]:
        self._rebuild(header["step"], set(header["lost"]))
        return {"ok": True}, []

    def _trainer_shutdown(self, header: dict) -> tuple[dict, list]:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        return {"ok": True}, []

    # ---- state helpers (called with the lock held) ----------------------------------------------------

    def _new_slot(self, capacity: int) -> Slot:
        fd = os.memfd_create(f"leantrain-snapshot-node{self.node}", os.MFD_CLOEXEC)
        os.ftruncate(fd, capacity)
        self._uids += 1
        return Slot(uid=self._uids, fd=fd, capacity=capacity, memory=mmap.mmap(fd, capacity))

    def _reusable(self, slot: Slot, keep: set[int]) -> bool:
        if slot.writing or slot.hashing:
            return False
        return slot.step is None or (slot.step not in keep and not self.pins[slot.step] and slot.step != self.protected)

    def _node_slots(self, step: int) -> list[Slot] | None:
        """This node's committed, hashed slots of ``step`` in local-rank order, or None if any rank lacks it."""
        found = []
        for local_rank in range(self.run["local_world_size"]):
            slot = next((s for s in self.slots.get(local_rank, []) if s.step == step and s.digest and not s.hashing), None)
            if slot is None:
                return None
            found.append(slot)
        return found

    def _passed(self, step: int) -> bool:
        """True when every local rank has committed a snapshot newer than ``step``."""
        newest = [max((s.step for s in self.slots.get(r, []) if s.step is not None), default=-1)
                  for r in range(self.run["local_world_size"])]
        return min(newest) > step

    def _drop_all(self) -> None:
        for slots in self.slots.values():
            for slot in slots:
                slot.close()
        self.slots.clear()
        self.parity.clear()
        self.protected = self.protected_round = None
        self.global_step = self.last_round_step = 0

    # ---- background work ------------------------------------------------------------------------------

    def _hash_loop(self) -> None:
        while True:
            with self.lock:
                while not self._hash_queue:
                    self.lock.wait()
                slot = self._hash_queue.popleft()
                step, nbytes = slot.step, slot.nbytes
            value = digest(slot.memory[:nbytes])
            with self.lock:
                if slot.step == step:
                    slot.digest = value
                slot.hashing = False
                self.lock.notify_all()

    def _disk_loop(self) -> None:
        from .levels import commit_when_complete, write_node_payloads

        while True:
            with self.lock:
                while not self.disk_queue:
                    self.lock.wait()
                step = self.disk_queue[0]
                self.disk_busy = True
                deadline = time.monotonic() + self.timeout_s
                while (slots := self._node_slots(step)) is None and time.monotonic() < deadline:
                    self.lock.wait(0.5)
                run = dict(self.run)
            pinned = True
            try:
                if slots is None:
                    raise RuntimeError(f"the snapshot of step {step} is not complete in memory")
                directory = Path(run["directory"])
                buffers = [(memoryview(slot.memory)[: slot.nbytes], f"node {self.node} local rank {i}")
                           for i, slot in enumerate(slots)]
                write_node_payloads(directory, step, run["generation"], buffers, write_replicated=self.node == 0)
                self._unpin(step)
                pinned = False
                if self.node == 0:
                    commit_when_complete(directory, step, run["generation"], run["meta"], run["expected"],
                                         run["keep"], self.timeout_s, self.abandon_commits)
                    with self.lock:
                        if run.get("level3_dir"):
                            self.level3_step = step
                        self.lock.notify_all()
            except Exception as error:  # noqa: BLE001 - reported by the next flush
                log.exception("saving step %d to disk failed", step)
                with self.lock:
                    self.disk_errors.append(f"disk checkpoint of step {step}: {error}")
                if pinned:
                    self._unpin(step)
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

    # ---- erasure coding ---------------------------------------------------------------------------------

    def _group(self) -> Group | None:
        ec = self.run["ec"] if self.run else None
        if not ec or not ec["k"]:
            return None
        return group_of(self.node, self.run["nnodes"], ec["k"], ec["m"])

    def _codec(self):
        ec = self.run["ec"]
        return make_codec(ec["k"], ec["m"], ec["library"])

    def _leader_loop(self) -> None:
        round_id = int(time.time() * 1000) % 1_000_000_000 * 1000 + self.node
        while True:
            with self.lock:
                while True:
                    group = self._group() if self.run else None
                    ready = (group is not None and group.nodes[0] == self.node and not self.stopping
                             and self.global_step > self.last_round_step
                             and all(node in self.peers for node in group.nodes))
                    if ready:
                        break
                    self.lock.wait(1.0)
                step = self.global_step
                round_id += 1
                self.rounds[round_id] = Round(step)
            outcome = self._run_round(group, round_id, step)
            with self.lock:
                self.rounds.pop(round_id, None)
                if outcome == "done":
                    self.last_round_step = max(self.last_round_step, step)
            if outcome == "failed":  # a peer is unreachable: wait for it to come back
                time.sleep(1.0)

    def _run_round(self, group: Group, round_id: int, step: int) -> str:
        """One round for ``step``: "done", "stale" (a member moved past the step; retry at once) or "failed"."""
        outcome = "failed"
        try:
            for node in group.nodes:
                reply = self._call(node, {"op": "ec_begin", "step": step, "round": round_id})
                if not reply[0].get("ok"):
                    outcome = "stale"
                    raise RuntimeError(f"node {node} no longer holds step {step}")
            deadline = time.monotonic() + self.timeout_s
            with self.lock:
                while len(self.rounds[round_id].acks) < group.n * group.m:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"erasure-coding round of step {step} timed out")
                    self.lock.wait(0.5)
            for node in group.nodes:
                self._call(node, {"op": "ec_done", "step": step, "round": round_id})
            return "done"
        except Exception as error:  # noqa: BLE001 - a failed round is retried
            if outcome == "failed" and str(error) != self._last_round_error:
                log.warning("erasure-coding round of step %d failed: %s (retrying every second)", step, error)
            self._last_round_error = str(error) if outcome == "failed" else ""
            for node in group.nodes:
                try:
                    self._call(node, {"op": "ec_abort", "round": round_id})
                except Exception:  # noqa: BLE001 - that node is gone; nothing to undo there
                    pass
            return outcome

    def _serve_peer(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(self.timeout_s)
            header, payload, _ = wire.receive(connection)
            try:
                reply, data = getattr(self, f"_peer_{header['op']}")(header, payload)
            except Exception as error:  # noqa: BLE001 - reported to the caller
                log.warning("peer request %s failed: %s", header.get("op"), error)
                reply, data = {"error": f"keeper of node {self.node}: {error}"}, b""
            wire.send(connection, reply, data)
        except (wire.PeerGone, OSError):
            pass
        finally:
            connection.close()

    def _call(self, node: int, header: dict, payload: bytes = b"") -> tuple[dict, bytearray]:
        host, port = self.peers[node]
        with wire.connect_tcp(host, port, self.timeout_s) as connection:
            reply, data, _ = wire.request(connection, header, payload)
        return reply, data

    def _peer_ec_begin(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        step, round_id = header["step"], header["round"]
        with self.lock:
            deadline = time.monotonic() + self.timeout_s
            while (slots := self._node_slots(step)) is None and time.monotonic() < deadline:
                if self._passed(step):  # every local rank has moved beyond it: it is gone here
                    return {"ok": False}, b""
                self.lock.wait(0.05)
            if slots is None:
                return {"ok": False}, b""
            self.pins[step] += 1
            self.round_pins[round_id] = step
            group = self._group()
        threading.Thread(target=self._send_fragments, args=(group, round_id, step, slots), daemon=True).start()
        return {"ok": True}, b""

    def _send_fragments(self, group: Group, round_id: int, step: int, slots: list[Slot]) -> None:
        position = group.position(self.node)
        manifest = _manifest(slots)
        for index in range(group.k):
            stripe = group.stripe_of(position, index)
            data = _fragment(slots, group.k, index)
            header = {"op": "ec_fragment", "step": step, "round": round_id, "stripe": stripe, "index": index,
                      "manifest": manifest}
            try:
                self._call(group.nodes[stripe], header, data)
            except Exception as error:  # noqa: BLE001 - the leader times the round out
                log.debug("sending fragment %d of step %d failed: %s", index, step, error)
                return

    def _peer_ec_fragment(self, header: dict, payload: bytearray) -> tuple[dict, bytes]:
        key = (header["round"], header["stripe"])
        with self.lock:
            group = self._group()
            received = self.gathering.setdefault(key, {})
            received[header["index"]] = (bytes(payload), header["manifest"])
            if len(received) < group.k:
                return {"ok": True}, b""
            del self.gathering[key]
        data = [received[index][0] for index in range(group.k)]
        parity, lengths, meta = encode_stripe(self._codec(), data)
        manifests = [received[index][1] for index in range(group.k)]
        for index, block in enumerate(parity):
            holder = group.nodes[group.parity_positions(header["stripe"])[index]]
            message = {"op": "ec_parity", "step": header["step"], "round": header["round"], "stripe": header["stripe"],
                       "index": index, "lengths": lengths, "meta": base64.b64encode(meta).decode(),
                       "manifests": manifests, "leader": group.nodes[0]}
            self._call(holder, message, block)
        return {"ok": True}, b""

    def _peer_ec_parity(self, header: dict, payload: bytearray) -> tuple[dict, bytes]:
        record = ParityRecord(step=header["step"], stripe=header["stripe"], index=header["index"], block=bytes(payload),
                              lengths=header["lengths"], meta=base64.b64decode(header["meta"]),
                              manifests=header["manifests"])
        with self.lock:
            self.parity[(header["stripe"], header["round"])] = record
        self._call(header["leader"], {"op": "ec_stored", "round": header["round"], "stripe": header["stripe"],
                                      "index": header["index"]})
        return {"ok": True}, b""

    def _peer_ec_stored(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        with self.lock:
            if header["round"] in self.rounds:
                self.rounds[header["round"]].acks.add((header["stripe"], header["index"]))
                self.lock.notify_all()
        return {"ok": True}, b""

    def _peer_ec_done(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        with self.lock:
            self._release_round(header["round"])
            self.protected, self.protected_round = header["step"], header["round"]
            self.parity = {key: record for key, record in self.parity.items() if key[1] == header["round"]}
            self.lock.notify_all()
        log.info("step %d is protected by parity", header["step"])
        return {"ok": True}, b""

    def _peer_ec_abort(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        with self.lock:
            self._release_round(header["round"])
            self.parity = {key: r for key, r in self.parity.items() if key[1] != header["round"]}
            self.gathering = {key: v for key, v in self.gathering.items() if key[0] != header["round"]}
            self.lock.notify_all()
        return {"ok": True}, b""

    def _unpin(self, step: int) -> None:
        with self.lock:
            self.pins[step] -= 1
            self.lock.notify_all()

    def _release_round(self, round_id: int) -> None:
        step = self.round_pins.pop(round_id, None)
        if step is not None:
            self.pins[step] -= 1

    def _peer_get_fragment(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        step, stripe = header["step"], header["stripe"]
        with self.lock:
            group = self._group()
            slots = self._node_slots(step)
            if slots is None:
                raise RuntimeError(f"no complete snapshot of step {step}")
            kind, index = group.block_of(stripe, group.position(self.node))
            if kind != "data":
                raise RuntimeError(f"node {self.node} holds parity, not data, of stripe {stripe}")
            self.pins[step] += 1
        try:
            return {"index": index}, _fragment(slots, group.k, index)
        finally:
            with self.lock:
                self.pins[step] -= 1

    def _peer_get_parity(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        with self.lock:
            record = self.parity.get((header["stripe"], self.protected_round))
            if record is None or record.step != header["step"]:
                raise RuntimeError(f"no parity of stripe {header['stripe']} for step {header['step']}")
        reply = {"index": record.index, "lengths": record.lengths, "meta": base64.b64encode(record.meta).decode(),
                 "manifests": record.manifests}
        return reply, record.block

    def _rebuild(self, step: int, lost: set[int]) -> None:
        """Rebuild this node's snapshot of ``step`` from the blocks that the group's survivors hold."""
        with self.lock:
            group, codec = self._group(), self._codec()
        position = group.position(self.node)
        fragments, manifest = [], None
        for index in range(group.k):
            stripe = group.stripe_of(position, index)
            blocks, lengths, meta = {}, None, b""
            for other in range(group.n):
                node = group.nodes[other]
                if other == position or node in lost or len(blocks) == group.k:
                    continue
                kind, block_index = group.block_of(stripe, other)
                op = "get_fragment" if kind == "data" else "get_parity"
                try:
                    reply, data = self._call(node, {"op": op, "step": step, "stripe": stripe})
                except Exception as error:  # noqa: BLE001 - another survivor may stand in
                    log.warning("node %d could not give block of stripe %d: %s", node, stripe, error)
                    continue
                if kind == "parity":
                    lengths, meta = reply["lengths"], base64.b64decode(reply["meta"])
                    manifest = manifest or reply["manifests"][index]
                    blocks[group.k + block_index] = data
                else:
                    blocks[block_index] = data
            if lengths is None or len(blocks) < group.k:
                raise RuntimeError(f"stripe {stripe} of step {step}: only {len(blocks)} of {group.k} blocks survive")
            fragments.append(decode_stripe(codec, blocks, lengths, meta)[index])
        blob = join_fragments(fragments, manifest["blob_length"])
        start = 0
        with self.lock:
            for entry in manifest["ranks"]:
                piece = memoryview(blob)[start : start + entry["nbytes"]]
                start += entry["nbytes"]
                if digest(piece) != entry["digest"]:
                    raise RuntimeError(f"rebuilt snapshot of local rank {entry['local_rank']} fails its checksum")
                slots = self.slots.setdefault(entry["local_rank"], [])
                slot = self._new_slot(max(entry["nbytes"], 64))
                slot.memory[: entry["nbytes"]] = piece
                slot.step, slot.nbytes, slot.digest = step, entry["nbytes"], entry["digest"]
                slots.append(slot)
            self.lock.notify_all()
        log.info("rebuilt the snapshot of step %d from the parity of the group %s", step, group.nodes)


def _manifest(slots: list[Slot]) -> dict:
    ranks = [{"local_rank": i, "nbytes": s.nbytes, "digest": s.digest} for i, s in enumerate(slots)]
    return {"ranks": ranks, "blob_length": sum(s.nbytes for s in slots)}


def _fragment(slots: list[Slot], k: int, index: int) -> bytes:
    """Fragment ``index`` of the node's blob (its local ranks' snapshots back to back), zero-padded."""
    total = sum(slot.nbytes for slot in slots)
    length = fragment_length(total, k)
    start, end = index * length, min((index + 1) * length, total)
    pieces, offset = [], 0
    for slot in slots:
        lo, hi = max(start, offset), min(end, offset + slot.nbytes)
        if lo < hi:
            pieces.append(slot.memory[lo - offset : hi - offset])
        offset += slot.nbytes
    data = b"".join(pieces)
    return data + bytes(length - len(data))




def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="leantrain's per-node snapshot keeper")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--node", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--idle-s", type=float, default=300.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--detach", action="store_true", help="fork, so that no trainer is this process's parent")
    args = parser.parse_args(argv)
    if args.detach and os.fork() > 0:
        os._exit(0)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s keeper %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Keeper(Path(args.run_dir), args.node, args.host, args.idle_s, args.timeout_s).serve()


if __name__ == "__main__":
    main()
