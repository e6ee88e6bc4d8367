"""A trainer's side of its node's keeper: find it (starting it if this is local rank 0) and talk to it."""

import contextlib
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import wire
from .disk import CheckpointError
from .keeper import record_path, socket_name


class KeeperGone(CheckpointError):
    """The node's keeper stopped answering (killed, or its node failed): its snapshots are lost."""


class KeeperClient:
    """One trainer's connection to the keeper of its node; thread-safe (the copier thread commits).

    A keeper that dies takes the memory snapshots with it; a request to it then raises ``KeeperGone``
    at once (its socket is closed) rather than waiting, and the run stops with that message.
    """

    def __init__(self, connection: socket.socket, name: str, local_rank: int) -> None:
        self.connection, self.name, self.local_rank = connection, name, local_rank
        self._lock = threading.Lock()
        self._mappings: dict[int, mmap.mmap] = {}

    @classmethod
    def attach(cls, run_dir: Path, name: str, local_rank: int, start: bool, host: str, idle_s: float,
               timeout_s: float, hello: dict[str, Any] | None = None) -> tuple["KeeperClient", dict]:
        """Connect to the node's keeper and say ``hello``; if ``start`` and none answers, launch one.

        Returns the client and the keeper's answer to hello. A keeper that is just exiting (its
        run ended, or it was killed) may still accept a connection and then drop it: try again.
        """
        deadline = time.monotonic() + timeout_s
        launched = False
        while True:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(socket_name(run_dir, name))
                client = cls(connection, name, local_rank)
                reply, _ = client.call("hello", local_rank=local_rank, run=hello) if hello else ({}, [])
                return client, reply
            except (FileNotFoundError, ConnectionError, wire.PeerGone):
                connection.close()
            if start and not launched:
                launch_keeper(run_dir, name, host, idle_s, timeout_s)
                launched = True
            if time.monotonic() > deadline:
                log = record_path(run_dir, name).with_suffix(".log")
                raise UserError(
                    f"the snapshot keeper of node {name} did not answer within checkpoint.keeper_timeout_s="
                    f"{timeout_s:g} s (its log: {log})"
                )
            time.sleep(0.1)

    def call(self, op: str, **fields: Any) -> tuple[dict, list[int]]:
        with self._lock, self._gone_on_error(op):
            reply, _, fds = wire.request(self.connection, {"op": op, **fields})
        return reply, fds

    def tell(self, op: str, **fields: Any) -> None:
        """A request without an answer (commit, complete): it is in the keeper's hands once sent."""
        with self._lock, self._gone_on_error(op):
            wire.send(self.connection, {"op": op, **fields})

    @contextlib.contextmanager
    def _gone_on_error(self, op: str):
        try:
            yield
        except (ConnectionError, OSError) as error:  # PeerGone is a ConnectionError
            raise KeeperGone(
                f"the snapshot keeper of node {self.name} is gone ({op}: {error}): it was killed or its node failed, "
                "and its memory snapshots with it. The run stops here; run the same command again to resume from "
                "the newest disk checkpoint"
            ) from error

    def mapping(self, uid: int, fd: int, capacity: int) -> mmap.mmap:
        """The shared memory of slot ``uid``, mapped once; ``fd`` is closed either way."""
        try:
            if uid not in self._mappings:
                self._mappings[uid] = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)
        return self._mappings[uid]

    def release(self, uid: int) -> None:
        """Unmap slot ``uid`` (the keeper replaced it); a view still alive keeps it until it goes."""
        memory = self._mappings.pop(uid, None)
        if memory is not None:
            try:
                memory.close()
            except BufferError:
                pass

    def close(self) -> None:
        for memory in self._mappings.values():
            try:
                memory.close()
            except BufferError:  # a tensor still views it; the mapping goes with the process
                pass
        self._mappings.clear()
        self.connection.close()


def launch_keeper(run_dir: Path, name: str, host: str, idle_s: float, timeout_s: float) -> None:
    """Start a keeper in its own session, detached (it daemonises), logging to ``keepers/<name>.log``."""
    log_path = record_path(run_dir, name).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "leantrain.checkpoint.keeper", "--run-dir", str(Path(run_dir).resolve()),
               "--name", name, "--host", host, "--idle-s", str(idle_s), "--timeout-s", str(timeout_s),
               "--detach"]
    with open(log_path, "ab") as log:
        launcher = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True, env=env)
    threading.Thread(target=launcher.wait, daemon=True).start()  # reaps the launcher, which forks and exits


def node_name() -> str:
    """This machine's name for its keeper: LEANTRAIN_NODE_NAME if set (several agents on one machine),
    else the host name. A node restarted under the same name finds the keeper that survived it."""
    return os.environ.get("LEANTRAIN_NODE_NAME") or socket.gethostname()


def advertised_host() -> str:
    """This node's address as the other nodes reach it: the local end of a route to MASTER_ADDR."""
    master = os.environ.get("MASTER_ADDR")
    if not master:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
        return probe.getsockname()[0]
