"""When to checkpoint, what goes into a checkpoint, and where a run resumes from.

``Checkpointer`` is the trainer's one contact with checkpoint files. State comes as ``Stateful``
objects in two groups: ``replicated`` states are the same on every rank and rank 0 writes them once
(model and optimizer under DDP, LR schedule, step counters); ``per_rank`` states differ per rank and
each rank writes its own ``rank_<r>`` file (RNG states, data position, sharded model/optimizer).
All ranks must see one shared filesystem.

A run may resume at another world size when every per-rank object can take its state from those
all the saved ranks wrote: it has ``load_state_dicts(states)``, a list in rank order (sharded
states reassemble their shards, a data position that is global takes any, RNG states re-seed). With ``checkpoint.mode=sync`` the saves are synchronous:
training waits for them. With ``lazy`` the same calls go to multilevel.py: snapshots in host memory
held by a keeper process per node, disk checkpoints of the same layout streamed from them.
"""

import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..errors import UserError
from .config import MODES, CheckpointConfig
from .disk import (
    FINAL_WEIGHTS_FILE,
    LATEST_FILE,
    CheckpointError,
    commit_staging,
    find_checkpoints,
    latest_good_checkpoint,
    load_checkpoint,
    open_staging,
    prune,
    read_meta,
    repair,
    staging_path,
    verify_checkpoint,
    write_final_weights,
    write_payload,
    write_text_atomic,
)
from .multilevel import LazyCheckpointer, NodeLayout, SnapshotStats
from .states import load_states as _load_states

REPLICATED = "replicated"
_RESTORE_DECISION_FILE = ".checkpoint-restore.json"


class Stateful(Protocol):
    """Anything whose state round-trips through a dict: modules, optimizers, LR schedulers, ..."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class Checkpointer:
    """Saves every ``cfg.interval`` steps to ``<run_dir>/checkpoints`` and restores on start.

    ``fingerprint`` (JSON-able, nested dicts allowed) identifies the configuration: resuming from a
    checkpoint whose fingerprint differs is refused. Every rank constructs one and calls the same
    methods in the same order; ``barrier`` synchronises them (default: torch.distributed.barrier when
    ``world_size > 1``, nothing for one process).
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: Path,
        fingerprint: dict,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        layout: NodeLayout | None = None,
    ) -> None:
        if cfg.mode not in MODES:
            raise UserError(f"checkpoint.mode: unknown mode {cfg.mode!r}; choose {' or '.join(MODES)}")
        if cfg.interval < 0:
            raise UserError(f"checkpoint.interval must be >= 0 (0: no periodic saves), got {cfg.interval}")
        if cfg.keep < 1:
            raise UserError(f"checkpoint.keep must be >= 1, got {cfg.keep}")
        if not cfg.resume.strip():
            raise UserError("checkpoint.resume is empty; use auto, never or the path of a step_N directory")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if barrier is None and world_size > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("world_size > 1 needs a barrier or an initialised torch.distributed")
            barrier = dist.barrier
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.restore_source: str | None = None
        """Where the last ``restore`` loaded from (memory | peer | disk), None when it started fresh."""
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back from meta.json
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier or (lambda: None)
        self._last_saved_step = 0
        self._lazy = None
        if cfg.mode == "lazy":
            self._lazy = LazyCheckpointer(self, layout or NodeLayout.from_env(rank, world_size))

    @property
    def stats(self) -> SnapshotStats | None:
        """What lazy snapshots have cost the training loop so far (None in sync mode)."""
        return None if self._lazy is None else self._lazy.stats

    def barrier(self) -> None:
        self._barrier()

    def flush(self) -> None:
        """Lazy mode: wait for the snapshot in flight and the disk saves it started (sync: nothing to do)."""
        if self._lazy is not None:
            self._lazy.flush()

    def close(self, shutdown_keeper: bool = False) -> None:
        """Lazy mode: finish the snapshot in flight and detach from the keeper (stopping it, if asked)."""
        if self._lazy is not None:
            self._lazy.close(shutdown_keeper)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"

    def restore(self, replicated: dict[str, Stateful], per_rank: dict[str, Stateful]) -> int:
        """Load the checkpoint ``checkpoint.resume`` selects into the given objects; returns its step.

        Returns 0 when the run starts fresh. Rank 0 chooses and fully verifies the checkpoint, then
        shares its choice (or its error) with the other ranks through a file in the run directory, so
        that every rank resumes from the same step or every rank fails with the same message.
        In lazy mode memory snapshots come first (see multilevel.py); ``restore_source`` tells which.
        """
        if self._lazy is not None:
            return self._lazy.restore(replicated, per_rank)
        choice: Path | None = None
        failure: Exception | None = None
        if self.rank == 0:
            try:
                choice = self.choose_checkpoint(replicated, per_rank)
            except Exception as error:
                failure = error
            if self.world_size > 1:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                decision = {
                    "path": None if choice is None else str(choice),
                    "error": None if failure is None else str(failure),
                }
                write_text_atomic(self.run_dir / _RESTORE_DECISION_FILE, json.dumps(decision))
        self._barrier()
        if failure is not None:
            raise failure
        if self.rank != 0:
            decision = json.loads((self.run_dir / _RESTORE_DECISION_FILE).read_text())
            if decision["error"] is not None:
                raise UserError(f"rank 0 could not resume: {decision['error']}")
            choice = None if decision["path"] is None else Path(decision["path"])

        step = 0
        if choice is not None:
            step = self.load_disk(choice, replicated, per_rank)
            self._last_saved_step = step
            self.restore_source = "disk"
        self._barrier()
        if self.rank == 0 and self.world_size > 1:
            (self.run_dir / _RESTORE_DECISION_FILE).unlink(missing_ok=True)
        return step

    def load_disk(self, path: Path, replicated: dict[str, Stateful], per_rank: dict[str, Stateful],
                  skipped_memory: bool = False) -> int:
        """Load disk checkpoint ``path`` into the objects; returns its step.

        Saved by another number of ranks, each rank maps every rank's file and hands each per-rank
        object the list of their states (see the module docstring). ``skipped_memory``: say in the
        log line that lazy mode's memory snapshots were passed over for it.
        """
        saved = read_meta(path)
        saved_world = saved["meta"].get("world_size", self.world_size)
        if not per_rank or saved_world == self.world_size:
            names = [REPLICATED] + ([f"rank_{self.rank}"] if per_rank else [])
            content, payloads = load_checkpoint(path, names)
            _load_states(replicated, payloads[REPLICATED])
            if per_rank:
                _load_states(per_rank, payloads[f"rank_{self.rank}"])
            return content["step"]
        if self.rank == 0:
            memory = "; memory snapshots hold the old ranks' shards and are not used" if skipped_memory else ""
            warnings.warn(f"world size changed from {saved_world} to {self.world_size}: restoring from the disk "
                          f"checkpoint at step {saved['step']} ({path}), resharding its per-rank state "
                          f"{sorted(per_rank)}{memory}", stacklevel=2)
        names = [REPLICATED] + [f"rank_{r}" for r in range(saved_world)]
        content, payloads = load_checkpoint(path, names, mmap=True)
        _load_states(replicated, payloads[REPLICATED])
        for name, obj in per_rank.items():
            obj.load_state_dicts([payloads[f"rank_{r}"][name] for r in range(saved_world)])
        return content["step"]

    def wait_before_step(self) -> None:
        """Return once the optimizer may modify the saved state again.

        Synchronous saves are complete when ``after_step`` returns, so this does nothing in sync mode.
        In lazy mode it waits for the copies of the last snapshot that have not finished yet.
        """
        if self._lazy is not None:
            self._lazy.wait_before_step()

    def save_now(self, step: int, replicated: dict[str, Stateful], per_rank: dict[str, Stateful]) -> None:
        """Put ``step`` on disk and wait for it, unless it is there already (the run is stopping early).

        In lazy mode a memory snapshot of ``step`` already taken is written to disk from memory.
        """
        if self._lazy is not None:
            self._lazy.save_now(step, replicated, per_rank)
        else:
            self.after_step(step, replicated, per_rank, force=True)

    def after_step(
        self, step: int, replicated: dict[str, Stateful], per_rank: dict[str, Stateful], force: bool = False
    ) -> bool:
        """Save ``step`` if it is a multiple of ``checkpoint.interval`` (or ``force``); True if saved.

        A step already on disk (just saved, or just restored) is not saved again, nor is step 0 (the
        untrained start, which ``restore`` reports as a fresh start anyway). ``state_dict()`` of
        the replicated objects is called on rank 0 only, so it must not be a collective operation.
        In lazy mode a snapshot is taken every ``memory_interval`` steps and returns at once (``force``
        waits for it and its disk save: the run is stopping).
        """
        if self._lazy is not None:
            return self._lazy.after_step(step, replicated, per_rank, force)
        due = force or (self.cfg.interval > 0 and step % self.cfg.interval == 0)
        if not due or step < 1 or step == self._last_saved_step:
            return False
        directory = self.checkpoint_dir
        staging = staging_path(directory, step)
        with _disk_errors_named(directory, step, staging):
            if self.rank == 0:
                directory.mkdir(parents=True, exist_ok=True)
                repair(directory)
                open_staging(directory, step)
            self._barrier()
            if self.rank == 0:
                write_payload(staging, REPLICATED, {name: obj.state_dict() for name, obj in replicated.items()})
            if per_rank:
                states = {name: obj.state_dict() for name, obj in per_rank.items()}
                write_payload(staging, f"rank_{self.rank}", states)
            self._barrier()
            if self.rank == 0:
                meta = {
                    "fingerprint": self.fingerprint,
                    "world_size": self.world_size,
                    REPLICATED: sorted(replicated),
                    "per_rank": sorted(per_rank),
                }
                expected = [REPLICATED] + ([f"rank_{r}" for r in range(self.world_size)] if per_rank else [])
                commit_staging(directory, staging, step, meta, expected_names=expected)
                prune(directory, self.cfg.keep)
        self._barrier()
        self._last_saved_step = step
        return True

    def save_final(
        self, model_state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> Path | None:
        """Rank 0 writes the full ``model_state`` to ``<run_dir>/final/model.safetensors``; returns the path.

        Other ranks return None (their ``model_state`` is ignored) once the file is written. In lazy
        mode the run is over: the keepers finish their disk saves and exit.
        """
        if self._lazy is not None:
            return self._lazy.save_final(model_state, metadata)
        path = None
        if self.rank == 0:
            path = write_final_weights(model_state, self.final_dir, metadata)
        self._barrier()
        return path

    def choose_checkpoint(
        self, replicated: dict[str, Stateful], per_rank: dict[str, Stateful]
    ) -> Path | None:
        """The verified disk checkpoint to resume from, or None to start fresh; UserError if neither is safe.

        With ``checkpoint.level3_dir`` set, its checkpoints count too: the newer good one wins.
        """
        directory = self.checkpoint_dir
        repair(directory)
        level3 = Path(self.cfg.level3_dir) if self.cfg.mode == "lazy" and self.cfg.level3_dir else None
        if level3 is not None:
            repair(level3)
        existing = find_checkpoints(directory) + (find_checkpoints(level3) if level3 is not None else [])
        final_weights = self.final_dir / FINAL_WEIGHTS_FILE
        mode = self.cfg.resume.strip()
        if mode == "never":
            if existing or final_weights.exists():
                held = f"checkpoints in {directory}" if existing else f"the final weights {final_weights}"
                raise UserError(
                    f"checkpoint.resume=never, but the run directory {self.run_dir} already holds {held}; "
                    "choose a new run_dir, or delete them, or resume with checkpoint.resume=auto"
                )
            return None
        if mode == "auto":
            if not existing:
                if final_weights.exists():
                    raise UserError(
                        f"the run directory {self.run_dir} holds the final weights of a finished run "
                        f"({final_weights}) and no checkpoint to resume from; choose a new run_dir"
                    )
                return None
            path = latest_good_checkpoint(directory)
            if level3 is not None:
                newer = latest_good_checkpoint(level3, newer_than=-1 if path is None else _step(path))
                path = newer or path
            if path is None:
                where = directory if level3 is None else f"{directory} and {level3}"
                raise UserError(
                    f"every checkpoint in {where} is damaged (see the warnings); delete them, or set "
                    "checkpoint.resume to a good step_N directory"
                )
        else:
            path = Path(mode).expanduser()
            if not path.is_dir():
                raise UserError(f"checkpoint.resume={mode}: no such directory")
            verify_checkpoint(path)
        self._check_compatible(path, read_meta(path)["meta"], replicated, per_rank)
        return path

    def _check_compatible(
        self, path: Path, saved: dict, replicated: dict[str, Stateful], per_rank: dict[str, Stateful]
    ) -> None:
        differences = _fingerprint_differences(saved.get("fingerprint", {}), self.fingerprint)
        if differences:
            raise UserError(
                f"checkpoint {path} was saved with a different configuration than this run in "
                f"{self.run_dir} ({'; '.join(differences)}); use a new run_dir for the new "
                "configuration, or restore those values"
            )
        for group, current in ((REPLICATED, replicated), ("per_rank", per_rank)):
            if saved.get(group, []) != sorted(current):
                raise UserError(
                    f"checkpoint {path} holds {group} state {saved.get(group)}; this run has "
                    f"{sorted(current)}"
                )
        fixed = sorted(name for name, obj in per_rank.items() if not hasattr(obj, "load_state_dicts"))
        if fixed and saved.get("world_size") != self.world_size:
            raise UserError(
                f"checkpoint {path} was saved by {saved.get('world_size')} ranks and this run has "
                f"{self.world_size}: its per-rank state {fixed} cannot be redistributed; "
                f"resume with {saved.get('world_size')} ranks"
            )


def _step(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


@contextmanager
def _disk_errors_named(directory: Path, step: int, staging: Path) -> Iterator[None]:
    """An OSError of a save (disk full, permission denied) becomes a CheckpointError naming what is kept."""
    try:
        yield
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        kept = (directory / LATEST_FILE).read_text().strip() if (directory / LATEST_FILE).is_file() else None
        raise CheckpointError(
            f"saving the checkpoint of step {step} to {directory} failed: {error}; "
            + (f"the previous checkpoint {directory / kept} and {LATEST_FILE} are kept" if kept else
               "no earlier checkpoint exists")
            + ". Free space or fix the permissions, then resume with the same command"
        ) from error


def _fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two fingerprints."""
    old, new = _flatten(saved), _flatten(current)

    def show(values: dict[str, Any], key: str) -> str:
        return json.dumps(values[key]) if key in values else "(absent)"

    return [
        f"{key}: {show(old, key)} -> {show(new, key)}"
        for key in sorted(old.keys() | new.keys())
        if key not in old or key not in new or old[key] != new[key]
    ]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
