"""Levels 2 and 3, run by the keepers: memory snapshots written as disk checkpoints, and copies of those.

A level-2 checkpoint has the layout of disk.py, the same as a synchronous save, so either mode
resumes from the other's checkpoints. Each node's keeper writes its ranks' ``rank_<r>.pt`` (node 0
also ``replicated.pt``) from the snapshot in shared memory into a staging directory named by the
run's generation (a token drawn at each restore, so that leftovers of a crashed attempt are never
mixed in); node 0 commits it once every payload is there. Level 3 copies committed checkpoints to
a second directory, verifying every byte against the SHA-256 in meta.json as it streams.
"""

import secrets
import shutil
import threading
import time
from pathlib import Path

from .disk import (
    commit_staging,
    copy_payload,
    open_staging,
    prune,
    read_meta,
    staging_path,
    write_payload,
)
from .snapshot import Buffer, assemble

REPLICATED = "replicated"
_RECORD_SUFFIX = ".record.json"


def write_node_payloads(
    directory: Path, step: int, generation: str, snapshots: list[tuple[Buffer, str]], write_replicated: bool
) -> None:
    """Write this node's payloads of ``step`` (its local ranks' snapshots, in order) into the staging directory."""
    staging = staging_path(directory, step, tag=f"lazy-{generation}")
    staging.mkdir(parents=True, exist_ok=True)
    _, replicated, per_rank = assemble(snapshots, clone=False)
    if write_replicated:
        _write_fresh(staging, REPLICATED, replicated)
    for rank, states in per_rank.items():
        if states:
            _write_fresh(staging, f"rank_{rank}", states)


def discard_staging(directory: Path, step: int, generation: str) -> None:
    """Remove the staging directory of a save that failed: the step will never be committed."""
    shutil.rmtree(staging_path(directory, step, tag=f"lazy-{generation}"), ignore_errors=True)


def commit_when_complete(
    directory: Path, step: int, generation: str, meta: dict, expected: list[str], keep: int, timeout_s: float,
    abandon: threading.Event,
) -> Path:
    """Wait (up to ``timeout_s``, or until ``abandon`` is set) for every node's payloads, then commit and prune."""
    staging = staging_path(directory, step, tag=f"lazy-{generation}")
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [name for name in expected if not (staging / f"{name}{_RECORD_SUFFIX}").exists()]
        if not missing:
            break
        if time.monotonic() > deadline or abandon.is_set():
            raise TimeoutError(f"payloads {missing} of step {step} never arrived in {staging}")
        time.sleep(0.05)
    path = commit_staging(directory, staging, step, meta, expected_names=expected)
    prune(directory, keep)
    return path


def copy_checkpoint(checkpoint: Path, target_directory: Path, keep: int) -> Path:
    """Copy a committed checkpoint into ``target_directory`` (verified, atomic); keep the ``keep`` newest there."""
    content = read_meta(checkpoint)
    target_directory.mkdir(parents=True, exist_ok=True)
    staging = open_staging(target_directory, content["step"], tag=secrets.token_hex(4))
    try:
        for name in content["files"]:
            copy_payload(checkpoint, name, staging)
        path = commit_staging(target_directory, staging, content["step"], content["meta"],
                              expected_names=list(content["files"]))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prune(target_directory, keep)
    return path


def _write_fresh(staging: Path, name: str, payload: dict) -> None:
    """``write_payload``, first removing what a crashed attempt of the same generation may have left."""
    (staging / f"{name}.pt").unlink(missing_ok=True)
    (staging / f"{name}{_RECORD_SUFFIX}").unlink(missing_ok=True)
    write_payload(staging, name, payload)
