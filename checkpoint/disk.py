"""Crash-safe checkpoint files: write, commit, verify, load, prune.

Layout of a checkpoint directory (``<run_dir>/checkpoints``)::

    step_100/          one committed checkpoint
        meta.json      format version, step, size and SHA-256 of every payload file, the caller's meta
        replicated.pt  one torch.save file per payload name
        rank_0.pt
    latest             text file naming the step directory to resume from
    .tmp-*             saves in progress, or left behind by a crash; removed by ``repair``

A save writes every file into a staging directory, fsyncs it, renames it to ``step_N`` and only then
points ``latest`` at it, so a crash at any moment leaves the previous checkpoint whole and ``latest``
naming a complete one. Loading checks sizes and checksums first and unpickles with
``weights_only=True``: a checkpoint holds tensors and plain containers, never arbitrary objects.

Checksums are SHA-256: on CPUs with SHA extensions (x86 SHA-NI, ARMv8) hashlib's SHA-256 runs at
about 2 GB/s, faster than its BLAKE2b, it is computed on the bytes as ``torch.save`` writes them (no
second read), and anyone can check a file with ``sha256sum``.
"""

import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file

from ..errors import UserError

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"
FINAL_WEIGHTS_FILE = "model.safetensors"

_STEP_DIR = re.compile(r"step_(\d+)")
_PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_STAGING_PREFIX = ".tmp-"
_SUPERSEDED_PREFIX = ".superseded-"
_RECORD_SUFFIX = ".record.json"
_READ_CHUNK = 16 << 20
_PLAIN_SCALARS = (int, float, complex, str, bool, type(None), torch.dtype, torch.device)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


class CheckpointError(UserError):
    """A checkpoint on disk is missing, truncated, corrupt or unsafe to load."""


def save_checkpoint(directory: Path, step: int, files: dict[str, dict], meta: dict) -> Path:
    """Write ``files`` (payload name -> nested state) as ``<directory>/step_<step>``; point ``latest`` there.

    Single-process form of ``open_staging`` + ``write_payload`` + ``commit_staging``. A failure
    midway removes the staging directory and leaves every earlier checkpoint and ``latest`` untouched.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    json.dumps(meta)  # fail before writing anything if meta is not JSON
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    repair(directory)
    staging = open_staging(directory, step, tag=secrets.token_hex(4))
    try:
        for name, payload in files.items():
            write_payload(staging, name, payload)
        return commit_staging(directory, staging, step, meta, expected_names=list(files))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def staging_path(directory: Path, step: int, tag: str = "") -> Path:
    """Where the save of ``step`` is assembled; ranks that share a save agree on it through ``tag``."""
    suffix = f"-{tag}" if tag else ""
    return Path(directory) / f"{_STAGING_PREFIX}step_{step}{suffix}"


def open_staging(directory: Path, step: int, tag: str = "") -> Path:
    """Create an empty staging directory for ``step``, removing a leftover of the same name."""
    staging = staging_path(directory, step, tag)
    staging.parent.mkdir(parents=True, exist_ok=True)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def write_payload(staging: Path, name: str, payload: dict) -> None:
    """torch.save ``payload`` to ``<staging>/<name>.pt``, fsynced, with its size and SHA-256 beside it.

    The record file lets ``commit_staging`` (possibly on another rank) list every file in meta.json
    without reading the payloads again.
    """
    if not _PAYLOAD_NAME.fullmatch(name):
        raise ValueError(f"payload name {name!r} must be letters, digits, '_', '.', '-'")
    check_loadable(payload, name)
    staging = Path(staging)
    with open(staging / f"{name}.pt", "xb") as file:
        writer = _HashingWriter(file)
        try:
            torch.save(payload, writer)
        except RuntimeError:  # torch.save reports a failed write as its own error: give the OSError (disk full)
            if writer.error is not None:
                raise writer.error from None
            raise
        file.flush()
        os.fsync(file.fileno())
    record = {"size": writer.size, "sha256": writer.sha256.hexdigest()}
    # Atomic: with several nodes writing into one staging directory, the committer polls for records.
    write_text_atomic(staging / f"{name}{_RECORD_SUFFIX}", json.dumps(record))


def copy_payload(checkpoint: Path, name: str, staging: Path) -> None:
    """Copy payload ``name`` of a committed checkpoint into ``staging``, checking it on the way.

    The bytes are hashed as they stream through, so a damaged source is refused (CheckpointError
    naming the file) without a second read; the copy is fsynced and gets its record like
    ``write_payload``'s.
    """
    record = read_meta(checkpoint)["files"].get(name)
    source = Path(checkpoint) / f"{name}.pt"
    if record is None:
        raise CheckpointError(f"{checkpoint} has no payload {name!r}")
    with open(source, "rb") as reader, open(Path(staging) / f"{name}.pt", "xb") as file:
        writer = _HashingWriter(file)
        while chunk := reader.read(_READ_CHUNK):
            writer.write(chunk)
        file.flush()
        os.fsync(file.fileno())
    if writer.size != record["size"] or writer.sha256.hexdigest() != record["sha256"]:
        raise CheckpointError(f"{source} is truncated or corrupt: its size or SHA-256 differs from {META_FILE}")
    write_text_atomic(Path(staging) / f"{name}{_RECORD_SUFFIX}", json.dumps(record))


def commit_staging(
    directory: Path, staging: Path, step: int, meta: dict, expected_names: list[str] | None = None
) -> Path:
    """Seal a staging directory as ``<directory>/step_<step>`` and point ``latest`` at it.

    Writes meta.json from the payload records, fsyncs, renames, fsyncs the parent, then updates
    ``latest``. An existing ``step_<step>`` is moved aside, not deleted, until the new one is in place.
    """
    directory, staging = Path(directory), Path(staging)
    records = sorted(staging.glob(f"*{_RECORD_SUFFIX}"))
    files = {}
    for record_path in records:
        name = record_path.name[: -len(_RECORD_SUFFIX)]
        record = json.loads(record_path.read_text())
        written = (staging / f"{name}.pt").stat().st_size
        if written != record["size"]:
            raise RuntimeError(f"{staging / name}.pt has {written} bytes, its record says {record['size']}")
        files[name] = record
    if expected_names is not None and sorted(files) != sorted(expected_names):
        raise RuntimeError(f"{staging} holds payloads {sorted(files)}, expected {sorted(expected_names)}")
    content = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "checksum": "sha256",
        "files": files,
        "torch_version": torch.__version__,
        "meta": meta,
    }
    _write_synced(staging / META_FILE, json.dumps(content, indent=1, sort_keys=True))
    for record_path in records:
        record_path.unlink()
    _fsync_dir(staging)
    target = directory / f"step_{step}"
    _move_into_place(staging, target)
    write_text_atomic(directory / LATEST_FILE, target.name + "\n")
    return target


def read_meta(path: Path) -> dict:
    """The parsed meta.json of checkpoint ``path``; CheckpointError if missing, damaged or too new."""
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {META_FILE}")
    try:
        content = json.loads(meta_path.read_bytes().decode("utf-8"))
        version = content["format_version"]
        if not isinstance(content["step"], int) or not isinstance(content["meta"], dict):
            raise ValueError("step or meta has the wrong type")
        for name, record in content["files"].items():
            if not _PAYLOAD_NAME.fullmatch(name):
                raise ValueError(f"payload name {name!r} is not a plain file name")
            if not isinstance(record["size"], int) or not isinstance(record["sha256"], str):
                raise ValueError(f"record of {name!r} has the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{meta_path} is damaged or truncated ({error})") from error
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {version!r}; this leantrain reads up to {FORMAT_VERSION}"
        )
    return content


def verify_checkpoint(path: Path, names: list[str] | None = None) -> dict:
    """Check sizes and SHA-256 of the named payload files (all if None); returns the parsed meta.json."""
    content = read_meta(path)
    for name in content["files"] if names is None else names:
        _verify_file(Path(path), name, content, checksum=True)
    return content


def load_checkpoint(
    path: Path, names: list[str] | None = None, map_location: Any = "cpu", mmap: bool = False
) -> tuple[dict, dict[str, dict]]:
    """Verify, then load the named payloads (all if None) with ``torch.load(weights_only=True)``.

    ``mmap`` maps the files instead of reading them: tensors are read from disk when touched.

    Returns (parsed meta.json, payload name -> state). Any damage or a payload that would need
    arbitrary unpickling raises CheckpointError naming the file.
    """
    path = Path(path)
    content = verify_checkpoint(path, names)
    payloads = {}
    for name in content["files"] if names is None else names:
        file = path / f"{name}.pt"
        try:
            payloads[name] = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            detail = next((line for line in str(error).splitlines() if "nsupported" in line), "")
            raise CheckpointError(
                f"{file} holds something other than tensors and plain containers; refusing to unpickle it"
                + (f" ({detail.strip()})" if detail else "")
            ) from error
        except (RuntimeError, EOFError, ValueError) as error:
            raise CheckpointError(f"{file} cannot be read: {error}") from error
    return content, payloads


def find_checkpoints(directory: Path) -> list[Path]:
    """The ``step_N`` directories in ``directory``, highest step first (staging leftovers ignored)."""
    return [path for _, path in _step_dirs(Path(directory))]


def latest_good_checkpoint(directory: Path, newer_than: int = -1) -> Path | None:
    """The checkpoint ``latest`` names if it verifies, else the newest older one that does.

    Each damaged checkpoint skipped is reported with a warning. Checkpoints with a higher step than
    ``latest`` (from a run that was rewound to an earlier step) are tried last. Only steps above
    ``newer_than`` are considered.
    """
    for path in _resume_order(Path(directory)):
        if int(_STEP_DIR.fullmatch(path.name)[1]) <= newer_than:
            continue
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as error:
            warnings.warn(f"skipping damaged checkpoint {path}: {error}", stacklevel=2)
    return None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest intact checkpoints, in resume order.

    Damaged checkpoints among the newest do not count towards ``keep``, so the last intact one is
    never deleted; the one ``latest`` names is always kept. Intact means meta.json parses and every
    file has its recorded size; checksums are left to loading so that pruning stays cheap.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    intact = 0
    for path in _resume_order(directory):
        if intact < keep:
            intact += _is_intact(path)
            continue
        _remove_dir(path)
    _fsync_dir(directory)


def repair(directory: Path) -> None:
    """Finish what a crash interrupted: restore a moved-aside checkpoint, drop staging leftovers."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(_SUPERSEDED_PREFIX):
            original = directory / entry.name[len(_SUPERSEDED_PREFIX) :].rsplit("-", 1)[0]
            if original.exists():
                shutil.rmtree(entry)
            else:
                os.rename(entry, original)
    for entry in directory.iterdir():
        if entry.name.startswith(_STAGING_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    _fsync_dir(directory)


def write_final_weights(
    state_dict: dict[str, torch.Tensor], directory: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``state_dict`` to ``<directory>/model.safetensors`` atomically (temp file, fsync, replace).

    Tensors that share memory (tied weights, views) are stored as separate copies, so every name
    loads back with ``safetensors.torch.load_file``; all are moved to CPU and made contiguous.
    """
    metadata = {"format": "pt", **(metadata or {})}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
    tensors = {}
    seen_storages = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"final weights: {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        shared = storage.nbytes() > 0 and storage.data_ptr() in seen_storages
        seen_storages.add(storage.data_ptr())
        if shared or storage.nbytes() != tensor.nbytes or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        tensors[name] = tensor
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(f"{_STAGING_PREFIX}{FINAL_WEIGHTS_FILE}-*"):
        leftover.unlink()
    target = directory / FINAL_WEIGHTS_FILE
    temporary = directory / f"{_STAGING_PREFIX}{FINAL_WEIGHTS_FILE}-{secrets.token_hex(4)}"
    try:
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return target


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    temporary = path.with_name(f"{_STAGING_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        _write_synced(temporary, text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _HashingWriter:
    """File-like sink for torch.save that counts and hashes the bytes on their way to ``file``."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None
        """The first failed write (ENOSPC, EFBIG, EIO), which torch.save would otherwise hide."""

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        written = 0
        try:
            while written < len(view):  # a short write is followed by the error, if there is one
                written += self.file.write(view[written:])
        except OSError as error:
            self.error = self.error or error
            raise
        self.sha256.update(view)
        self.size += written
        return written

    def flush(self) -> None:
        self.file.flush()


def check_loadable(value: Any, where: str) -> None:
    """Refuse at save time anything ``torch.load(weights_only=True)`` would refuse at resume time."""
    # Exact types: a subclass (IntEnum, namedtuple, defaultdict, DTensor) pickles as its own class.
    if type(value) in _TENSORS or type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _PLAIN_SCALARS:
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            check_loadable(item, f"{where}.{key}")
        return
    if type(value) in (list, tuple, torch.Size):
        for index, item in enumerate(value):
            check_loadable(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}: checkpoints hold only tensors, numbers, strings, bools, "
        "None, dtypes, devices and lists, tuples and dicts of them (exact types); convert it"
    )


def _verify_file(path: Path, name: str, content: dict, checksum: bool) -> None:
    record = content["files"].get(name)
    if record is None:
        raise CheckpointError(f"{path} has no payload {name!r}; it holds {sorted(content['files'])}")
    file = path / f"{name}.pt"
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    if size != record["size"]:
        raise CheckpointError(
            f"{file} is truncated or damaged: {size} bytes, {META_FILE} records {record['size']}"
        )
    if checksum:
        digest = hashlib.sha256()
        with open(file, "rb") as stream:
            while chunk := stream.read(_READ_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != record["sha256"]:
            raise CheckpointError(f"{file} is corrupt: its SHA-256 differs from the one in {META_FILE}")


def _is_intact(path: Path) -> bool:
    try:
        content = read_meta(path)
        for name in content["files"]:
            _verify_file(path, name, content, checksum=False)
    except CheckpointError:
        return False
    return True


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match[1]), entry))
    return sorted(found, key=lambda item: item[0], reverse=True)


def _resume_order(directory: Path) -> list[Path]:
    """``latest``'s target, then older checkpoints newest first, then any newer than ``latest``."""
    step_dirs = _step_dirs(directory)
    latest_file = directory / LATEST_FILE
    if not latest_file.is_file():
        return [path for _, path in step_dirs]
    named = latest_file.read_text().strip()
    match = _STEP_DIR.fullmatch(named)
    if not match or not (directory / named).is_dir():
        warnings.warn(f"{latest_file} names {named!r}, which is not a checkpoint; ignoring it", stacklevel=3)
        return [path for _, path in step_dirs]
    pivot = int(match[1])
    older = [path for step, path in step_dirs if step < pivot]
    newer = [path for step, path in step_dirs if step > pivot]
    return [directory / named, *older, *newer]


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is kept aside until the rename is done."""
    parent = target.parent
    if not target.exists():
        os.rename(staging, target)
        _fsync_dir(parent)
        return
    superseded = parent / f"{_SUPERSEDED_PREFIX}{target.name}-{secrets.token_hex(4)}"
    os.rename(target, superseded)
    _fsync_dir(parent)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(superseded, target)
        raise
    _fsync_dir(parent)
    shutil.rmtree(superseded)


def _remove_dir(path: Path) -> None:
    """Rename to a staging name first, so a crash mid-delete never leaves a partial ``step_N``."""
    doomed = path.with_name(f"{_STAGING_PREFIX}deleting-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
