"""A keeper's erasure-coding work with the other keepers of its group (REFT's protection against lost nodes).

Rounds are run by the first node of each group: it picks the newest step every rank has committed,
every member pins it and sends its fragments to the stripes' gatherers (parity.py says who holds
what), which encode and hand the parity blocks to their holders; once every block is stored the
round is done, the step becomes ``protected`` and older parity is dropped. A round that finds a
member already past the step is retried at once with a newer one; one that cannot reach a member
is aborted and retried every second. A node that lost its memory is rebuilt by asking the
survivors for k blocks of each stripe it had data in. Keepers talk over TCP, one connection per
request, in wire.py's frames.
"""

import base64
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import wire
from .erasure import Codec, make_codec
from .parity import Group, decode_stripe, encode_stripe, fragment_length, group_of, join_fragments
from .snapshot import digest

if TYPE_CHECKING:
    from .keeper import Keeper, Slot

log = logging.getLogger("leantrain.keeper")


@dataclass
class ParityRecord:
    """One parity block of one stripe, from one round, with what decoding needs."""

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


class GroupParity:
    """The erasure-coding state of one keeper; shares the keeper's lock, slots and pins."""

    def __init__(self, keeper: "Keeper") -> None:
        self.keeper = keeper
        self.protected: int | None = None
        """The newest step whose parity every holder has: survivors keep their snapshot of it."""
        self.protected_round: int | None = None
        self.candidate: int | None = None
        """The step the next round will likely ask for: its slot is reused last."""
        self.records: dict[tuple[int, int], ParityRecord] = {}
        self.rounds: dict[int, Round] = {}
        self.round_pins: dict[int, int] = {}
        self.gathering: dict[tuple[int, int], dict[int, tuple[bytes, dict]]] = {}
        self.last_round_step = 0
        self._last_error = ""

    # ---- state the keeper asks about (its lock held) ------------------------------------------------

    def held(self) -> list[tuple[int, int]]:
        """(stripe, step) of the parity blocks held for the protected step."""
        return sorted({(r.stripe, r.step) for (_, rnd), r in self.records.items() if rnd == self.protected_round})

    def reset(self, step: int, keep_memory: bool) -> None:
        """The run restarts at ``step``: parity of newer steps, or all after a disk load, is worthless."""
        if not keep_memory or (self.protected is not None and self.protected > step):
            self.records.clear()
            self.protected = self.protected_round = None
        self.last_round_step = 0  # encode the restart step again: a rebuilt node holds no parity yet

    def group(self) -> Group | None:
        run = self.keeper.run
        if not run or not run["ec"]["k"]:
            return None
        if self.keeper.index is None:
            return None
        return group_of(self.keeper.index, run["nnodes"], run["ec"]["k"], run["ec"]["m"])

    def codec(self) -> Codec:
        ec = self.keeper.run["ec"]
        return make_codec(ec["k"], ec["m"], ec["library"])

    # ---- rounds, led by the group's first node ---------------------------------------------------------

    def lead(self) -> None:
        """The leader's thread: a round for the newest complete step whenever there is a newer one."""
        keeper = self.keeper
        round_id = secrets.randbits(48) << 12  # unlike any id a leader before this one used
        while True:
            with keeper.lock:
                while True:
                    group = self.group()
                    if (group is not None and group.nodes[0] == keeper.index and not keeper.stopping
                            and keeper.global_step > self.last_round_step
                            and all(node in keeper.peers for node in group.nodes)):
                        break
                    keeper.lock.wait(1.0)
                step = keeper.global_step
                round_id += 1
                self.rounds[round_id] = Round(step)
            outcome = self._run_round(group, round_id, step)
            with keeper.lock:
                self.rounds.pop(round_id, None)
                if outcome == "done":
                    self.last_round_step = max(self.last_round_step, step)
            if outcome == "failed":  # a peer is unreachable: wait for it to come back
                time.sleep(1.0)

    def _run_round(self, group: Group, round_id: int, step: int) -> str:
        """One round for ``step``: "done", "stale" (a member moved past the step) or "failed"."""
        keeper = self.keeper
        outcome = "failed"
        try:
            for node in group.nodes:
                if not self.call(node, {"op": "ec_begin", "step": step, "round": round_id})[0].get("ok"):
                    outcome = "stale"
                    raise RuntimeError(f"node {node} no longer holds step {step}")
            deadline = time.monotonic() + keeper.timeout_s
            with keeper.lock:
                while len(self.rounds[round_id].acks) < group.n * group.m:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"erasure-coding round of step {step} timed out")
                    keeper.lock.wait(0.5)
        except Exception as error:  # noqa: BLE001 - a failed round is retried
            if outcome == "failed" and str(error) != self._last_error:
                log.warning("erasure-coding round of step %d failed: %s (retrying every second)", step, error)
            self._last_error = str(error) if outcome == "failed" else ""
            for node in group.nodes:
                try:
                    self.call(node, {"op": "ec_abort", "round": round_id})
                except Exception:  # noqa: BLE001 - that node is gone; nothing to undo there
                    pass
            return outcome
        # Every block is stored: the round is done, even for a member that dies before hearing it.
        for node in group.nodes:
            try:
                self.call(node, {"op": "ec_done", "step": step, "round": round_id})
            except Exception as error:  # noqa: BLE001 - the next round (or a rebuild) deals with it
                log.warning("node %d did not hear that step %d is protected: %s", node, step, error)
        return "done"

    # ---- the peer protocol --------------------------------------------------------------------------

    def serve(self, connection: socket.socket) -> None:
        """Answer one request of another keeper."""
        try:
            connection.settimeout(self.keeper.timeout_s)
            header, payload, _ = wire.receive(connection)
            try:
                reply, data = getattr(self, f"_on_{header['op']}")(header, payload)
            except Exception as error:  # noqa: BLE001 - reported to the caller
                log.warning("peer request %s failed: %s", header.get("op"), error)
                reply, data = {"error": f"keeper of node {self.keeper.name}: {error}"}, b""
            wire.send(connection, reply, data)
        except (wire.PeerGone, OSError):
            pass
        finally:
            connection.close()

    def call(self, node: int, header: dict, payload: bytes = b"") -> tuple[dict, bytearray]:
        host, port = self.keeper.peers[node]
        with wire.connect_tcp(host, port, self.keeper.timeout_s) as connection:
            reply, data, _ = wire.request(connection, header, payload)
        return reply, data

    def _on_ec_begin(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        keeper, step = self.keeper, header["step"]
        with keeper.lock:
            deadline = time.monotonic() + keeper.timeout_s
            while (slots := keeper.node_slots(step)) is None and time.monotonic() < deadline:
                if keeper.passed(step):  # every local rank has moved beyond it: it is gone here
                    return {"ok": False}, b""
                keeper.lock.wait(0.05)
            if slots is None:
                return {"ok": False}, b""
            self._release_all()  # one round at a time per group: any earlier one is over
            keeper.pins[step] += 1
            self.round_pins[header["round"]] = step
            group = self.group()
        threading.Thread(target=self._send_fragments, args=(group, header["round"], step, slots), daemon=True).start()
        return {"ok": True}, b""

    def _send_fragments(self, group: Group, round_id: int, step: int, slots: list["Slot"]) -> None:
        position = group.position(self.keeper.index)
        manifest = _manifest(slots)
        for index in range(group.k):
            stripe = group.stripe_of(position, index)
            header = {"op": "ec_fragment", "step": step, "round": round_id, "stripe": stripe, "index": index,
                      "manifest": manifest}
            try:
                self.call(group.nodes[stripe], header, _fragment(slots, group.k, index))
            except Exception as error:  # noqa: BLE001 - the leader times the round out
                log.debug("sending fragment %d of step %d failed: %s", index, step, error)
                return

    def _on_ec_fragment(self, header: dict, payload: bytearray) -> tuple[dict, bytes]:
        """As a stripe's gatherer: once all k data blocks are in, encode and hand out the parity."""
        key = (header["round"], header["stripe"])
        with self.keeper.lock:
            group = self.group()
            received = self.gathering.setdefault(key, {})
            received[header["index"]] = (bytes(payload), header["manifest"])
            if len(received) < group.k:
                return {"ok": True}, b""
            del self.gathering[key]
        parity, lengths, meta = encode_stripe(self.codec(), [received[i][0] for i in range(group.k)])
        manifests = [received[i][1] for i in range(group.k)]
        for index, block in enumerate(parity):
            holder = group.nodes[group.parity_positions(header["stripe"])[index]]
            message = {"op": "ec_parity", "step": header["step"], "round": header["round"], "stripe": header["stripe"],
                       "index": index, "lengths": lengths, "meta": base64.b64encode(meta).decode(),
                       "manifests": manifests, "leader": group.nodes[0]}
            self.call(holder, message, block)
        return {"ok": True}, b""

    def _on_ec_parity(self, header: dict, payload: bytearray) -> tuple[dict, bytes]:
        record = ParityRecord(step=header["step"], stripe=header["stripe"], index=header["index"], block=bytes(payload),
                              lengths=header["lengths"], meta=base64.b64decode(header["meta"]),
                              manifests=header["manifests"])
        with self.keeper.lock:
            self.records[(header["stripe"], header["round"])] = record
        self.call(header["leader"], {"op": "ec_stored", "round": header["round"], "stripe": header["stripe"],
                                     "index": header["index"]})
        return {"ok": True}, b""

    def _on_ec_stored(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        with self.keeper.lock:
            if header["round"] in self.rounds:
                self.rounds[header["round"]].acks.add((header["stripe"], header["index"]))
                self.keeper.lock.notify_all()
        return {"ok": True}, b""

    def _on_ec_done(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        with self.keeper.lock:
            self._release_all()
            self.protected, self.protected_round = header["step"], header["round"]
            self.records = {key: record for key, record in self.records.items() if key[1] == header["round"]}
            self.keeper.lock.notify_all()
        log.info("step %d is protected by parity", header["step"])
        return {"ok": True}, b""

    def _on_ec_abort(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        with self.keeper.lock:
            self._release(header["round"])
            if header["round"] == self.protected_round:  # done here already: its parity stays
                return {"ok": True}, b""
            self.records = {key: r for key, r in self.records.items() if key[1] != header["round"]}
            self.gathering = {key: v for key, v in self.gathering.items() if key[0] != header["round"]}
            self.keeper.lock.notify_all()
        return {"ok": True}, b""

    def _release(self, round_id: int) -> None:
        step = self.round_pins.pop(round_id, None)
        if step is not None:
            self.keeper.pins[step] -= 1

    def _release_all(self) -> None:
        for round_id in list(self.round_pins):
            self._release(round_id)

    def _on_get_fragment(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        keeper, step, stripe = self.keeper, header["step"], header["stripe"]
        with keeper.lock:
            group = self.group()
            slots = keeper.node_slots(step)
            if slots is None:
                raise RuntimeError(f"no complete snapshot of step {step}")
            kind, index = group.block_of(stripe, group.position(keeper.index))
            if kind != "data":
                raise RuntimeError(f"node {keeper.index} holds parity, not data, of stripe {stripe}")
            keeper.pins[step] += 1
        try:
            return {"index": index}, _fragment(slots, group.k, index)
        finally:
            keeper.unpin(step)

    def _on_get_parity(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        with self.keeper.lock:
            record = self.records.get((header["stripe"], self.protected_round))
            if record is None or record.step != header["step"]:
                raise RuntimeError(f"no parity of stripe {header['stripe']} for step {header['step']}")
        reply = {"index": record.index, "lengths": record.lengths, "meta": base64.b64encode(record.meta).decode(),
                 "manifests": record.manifests}
        return reply, record.block

    # ---- rebuilding a lost node ----------------------------------------------------------------------

    def rebuild(self, step: int, lost: set[int]) -> list[tuple[int, bytes, str]]:
        """This node's snapshots of ``step`` from the survivors' blocks: (local rank, bytes, digest), verified."""
        keeper = self.keeper
        with keeper.lock:
            group, codec = self.group(), self.codec()
        position = group.position(keeper.index)
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
                    reply, data = self.call(node, {"op": op, "step": step, "stripe": stripe})
                except Exception as error:  # noqa: BLE001 - another survivor may stand in
                    log.warning("node %d could not give its block of stripe %d: %s", node, stripe, error)
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
        snapshots, start = [], 0
        for entry in manifest["ranks"]:
            piece = blob[start : start + entry["nbytes"]]
            start += entry["nbytes"]
            if digest(piece) != entry["digest"]:
                raise RuntimeError(f"the rebuilt snapshot of local rank {entry['local_rank']} fails its checksum")
            snapshots.append((entry["local_rank"], piece, entry["digest"]))
        log.info("rebuilt the snapshot of step %d from the parity of the group %s", step, group.nodes)
        return snapshots


def _manifest(slots: list["Slot"]) -> dict:
    ranks = [{"local_rank": i, "nbytes": s.nbytes, "digest": s.digest} for i, s in enumerate(slots)]
    return {"ranks": ranks, "blob_length": sum(s.nbytes for s in slots)}


def _fragment(slots: list["Slot"], k: int, index: int) -> bytes:
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
