"""One run per run directory: a lock file naming its holder (PID, host, start time).

The main rank creates ``<run_dir>/leantrain.lock`` with ``O_EXCL`` before anything is written
there, and removes it when the run ends, on errors too. A second run on the same directory is
refused with a message naming the holder. A lock left by a killed run (same host, its process
gone, or the PID now belongs to a process started later) is stale: it is taken over with a
warning. A lock held from another host cannot be checked from here; the message says how to remove
it if that host is dead. Under torchrun, a lock of an earlier restart round of the same job is
stale too, wherever it was taken.
"""

import json
import os
import secrets
import socket
import time
import warnings
from pathlib import Path

from ..errors import UserError

LOCK_FILE = "leantrain.lock"
_UNREADABLE_STALE_S = 10.0


class RunLock:
    """The held lock of one run directory; ``release`` (or leaving the ``with`` block) removes it."""

    def __init__(self, path: Path, holder: dict) -> None:
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock ``run_dir`` for this process; UserError naming the holder if another run has it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _start_ticks(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_elastic_job()}
        for _ in range(10):  # a few rounds: another run may take over or release between our steps
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:  # released meanwhile
                    continue
                if not _is_stale(path, holder, me):
                    _refuse(path, holder, me["host"])
                _take_over(path, holder)
                continue
            with os.fdopen(descriptor, "w") as file:
                file.write(json.dumps(me))
                file.flush()
                os.fsync(file.fileno())
            return cls(path, me)
        raise UserError(f"could not lock the run directory {run_dir}: {path} keeps changing; is another run starting?")

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if _read(self.path) == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> dict | None:
    """The holder recorded in ``path``; {} while it is being written or if unreadable; None if it is gone."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(path: Path, holder: dict, me: dict) -> bool:
    """True if the holder ran on this host and its process is gone (or its PID was reused since), or
    it was an earlier round of this torchrun job (torchrun stops every worker before it restarts them,
    and a restarted rank 0 may run on another node).

    An unreadable lock is stale once it is older than a few seconds (its writer died mid-write).
    """
    if not holder:
        try:
            return time.time() - path.stat().st_mtime > _UNREADABLE_STALE_S
        except FileNotFoundError:
            return False
    if me.get("job") is not None and holder.get("job") == me["job"] and holder.get("restart", 0) < me["restart"]:
        return True
    if holder.get("host") != me["host"] or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    ticks = holder.get("start_ticks")
    return ticks is not None and _start_ticks(pid) not in (None, ticks)


def _take_over(path: Path, stale: dict) -> None:
    """Move the stale lock aside; if what moved is not the one judged stale, another run holds it: put it back."""
    aside = path.with_name(f".{LOCK_FILE}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != stale:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink()
        return
    aside.unlink()
    holder = f"process {stale['pid']} on {stale['host']}" if stale else "a writer that died mid-write"
    warnings.warn(f"taking over the stale lock {path} of {holder}, which is no longer running (a killed run)",
                  stacklevel=3)


def _refuse(path: Path, holder: dict | None, host: str) -> None:
    if not holder:
        raise UserError(f"the run directory {path.parent} is being locked by another run right now ({path}); "
                        "use another trainer.run_dir, or wait for it")
    where = f"process {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    if holder.get("host") == host:
        raise UserError(f"the run directory {path.parent} is in use by another run: {where} (lock file {path}); "
                        "wait for it to finish or stop it, or use another trainer.run_dir")
    raise UserError(f"the run directory {path.parent} is in use by another run: {where} (lock file {path}). "
                    f"This host ({host}) cannot check that process; if it is dead (its node failed), delete {path} "
                    "and start again")


def _elastic_job() -> dict:
    """torchrun's job id and restart round, when launched by torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return {}
    return {"job": os.environ["TORCHELASTIC_RUN_ID"], "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux /proc), to tell a reused PID apart; else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])
