"""Token data for the trainer: the Python stdlib corpus, pre-tokenized shards, or local text/JSONL files.

Every source ends up in one on-disk format, a *token directory*: ``meta.json``, the ``tokenizer.json`` that
produced the ids, and flat uint16/uint32 files ``train_00000.bin``, ``val_00000.bin``, ... read as memmaps.
``leantrain prepare-data`` writes one where the user asks; the stdlib and text sources write one into the
cache on first use. Validation holds out whole documents (files, JSONL records), never windows of training text.
``data.domains`` names several text sources; their documents are written one domain after another and
``meta.json`` records each domain's token range per split, so validation can be read domain by domain.

Training reads windows of seq_len + 1 tokens (stride seq_len, so every token is a target once) in a seeded
order reshuffled each epoch. One global sample cursor decides what every data-parallel rank reads, so W ranks
at micro-batch m read exactly what one rank at micro-batch W*m reads, and a resumed run continues at the exact
next sample.
"""

import argparse
import codecs
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sysconfig
import tempfile
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ..errors import UserError
from . import tokenizer as bpe

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SOURCES = ("stdlib", "shards", "text")
TEXT_SUFFIXES = (".txt", ".jsonl")
DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
DEFAULT_SHARD_TOKENS = 100_000_000
# Tests, IDLE and installed packages would make the corpus 10x larger or dependent on what is installed.
STDLIB_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__"}
)
ENCODE_BATCH_CHARS = 1 << 22  # text handed to one encode_batch call: enough to keep the Rust threads busy


@dataclass
class DataConfig:
    source: str = "stdlib"
    """Where tokens come from: stdlib (Python's own library source) | shards (from prepare-data) | text."""
    path: str = ""
    """shards: the directory written by `leantrain prepare-data`; text: a glob of .txt/.jsonl files."""
    tokenizer: str = ""
    """A HF tokenizer.json; empty for stdlib/text trains a byte-level BPE on the corpus and caches it."""
    vocab_size: int = 8192
    """Vocabulary size of the byte-level BPE trained on first use."""
    seq_len: int = 256
    """Tokens per training sample (each window holds seq_len + 1 for the shifted targets)."""
    val_fraction: float = 0.02
    """Share of documents (stdlib files, text files, JSONL records) held out for validation."""
    text_key: str = "text"
    """Field of each JSONL record that holds its text."""
    cache_dir: str = ""
    """Cache of tokenized corpora; empty means $LEANTRAIN_CACHE or ~/.cache/leantrain."""
    domains: dict[str, str] = field(default_factory=dict)
    """data.source=text from named domains instead of data.path: name -> glob of .txt/.jsonl files, or `stdlib`.
    Each domain holds out its own validation documents; validation loss and MoE routing are reported per domain."""


# ---- reading documents -------------------------------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's own ``.py`` files (no tests, IDLE or installed packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not STDLIB_SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_stdlib_file(path: Path) -> Iterator[str]:
    """A stdlib file as one document; the many empty ``__init__.py`` files yield nothing."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.strip():
        yield text


def match_files(patterns: list[str], setting: str) -> list[Path]:
    """The files matched by glob ``patterns`` (``**`` recurses), absolute and sorted; each must match some."""
    files: set[Path] = set()
    for pattern in patterns:
        if not pattern:
            raise UserError(f"{setting} is empty; give a glob of .txt/.jsonl files")
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            raise UserError(_directory_error(Path(pattern), setting))
        matches = [Path(m).resolve() for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise UserError(f"{setting}={pattern!r}: no such file (the glob matches nothing)")
        files.update(matches)
    return sorted(files)


def _directory_error(directory: Path, setting: str) -> str:
    """What to say when ``setting`` names a directory rather than a glob: a glob of its text files, if it has any."""
    texts = sorted(p for p in directory.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not texts:
        return (f"{setting}={str(directory)!r} is a directory with no {' or '.join(TEXT_SUFFIXES)} files in it; "
                "give a glob of text files")
    nested = "" if texts[0].parent == directory else "**/"
    example = f"{directory}/{nested}*{texts[0].suffix}"
    return f"{setting}={str(directory)!r} is a directory; give a glob of its files, e.g. {example}"


def read_documents(path: Path, text_key: str, setting: str) -> Iterator[str]:
    """The documents of one user file: each JSONL record's ``text_key`` field, or a whole text file."""
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{setting}: {path} is empty")
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_key)
            return
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(path, setting) from None
    except OSError as e:
        raise UserError(f"{setting}: cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise UserError(f"{setting}: {path} holds only whitespace")
    yield text


def _not_utf8(path: Path, setting: str) -> UserError:
    """The error naming the file offset and line of the first byte of ``path`` that is not UTF-8.

    Found by decoding again block by block: the decoder's own position is within its last buffer, not the file.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # the start of a character cut by the last block's end
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                line += block[: max(0, e.start - pending)].count(b"\n")
                return UserError(
                    f"{setting}: {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset "
                    f"{offset - pending + e.start} (line {line}) does not decode; convert the file to UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)"
                )
            if not block:
                return UserError(f"{setting}: {path} is not UTF-8 text")  # it changed since it was read
            offset += len(block)
            line += block.count(b"\n")


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    documents = 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{line_no} has no string field {text_key!r} (the text key: data.text_key / --text-key)"
                )
            if text:
                documents += 1
                yield text
    if documents == 0:
        raise UserError(f"{path} holds no non-empty {text_key!r} documents")


def corpus_documents(
    files: list[Path], read: Callable[[Path], Iterable[str]], bar: tqdm | None = None
) -> Iterator[str]:
    """All documents of ``files`` in order, advancing ``bar`` by each file's size in bytes."""
    for path in files:
        yield from read(path)
        if bar is not None:
            bar.update(path.stat().st_size)


def is_validation(index: int, val_fraction: float) -> bool:
    """Whether document ``index`` is held out: evenly spaced, floor(n * val_fraction) of the first n documents."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


# ---- writing a token directory -----------------------------------------------------------------------------


class ShardWriter:
    """Appends token ids to ``{split}_00000.bin``, ``{split}_00001.bin``, ... of at most ``shard_tokens`` each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self._file = open(self.directory / name, "wb")
                self.shards.append({"file": name, "split": self.split, "tokens": 0})
            shard = self.shards[-1]
            part = ids[: self.shard_tokens - shard["tokens"]]
            part.astype(self.dtype, copy=False).tofile(self._file)
            shard["tokens"] += len(part)
            ids = ids[len(part) :]
            if shard["tokens"] == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def write_token_dir(
    documents: Iterable[str] | Mapping[str, Iterable[str]],
    tokenizer_file: Path,
    out: Path,
    val_fraction: float,
    shard_tokens: int,
    source: str,
) -> dict:
    """Tokenize ``documents`` into the token directory ``out`` (which exists) and return its metadata.

    Each document is followed by the end-of-text token. ``meta.json`` is written last, so a directory with one
    is complete. A mapping of domain name -> documents writes the domains one after another, each holding out
    its own share for validation, and records their token ranges per split in ``meta["domains"]``.
    """
    tokenizer = bpe.load_tokenizer(tokenizer_file, "tokenizer")
    vocab_size = tokenizer.get_vocab_size()
    eos_id = bpe.find_eos_id(tokenizer, tokenizer_file)
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    pending: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}

    def flush() -> None:
        for split, texts in pending.items():
            if texts:
                encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
                writers[split].write(np.array([i for enc in encodings for i in (*enc.ids, eos_id)], dtype=dtype))
                texts.clear()

    groups = documents.items() if isinstance(documents, Mapping) else [(None, documents)]
    domains = []
    for name, group in groups:
        first = {split: writer.tokens for split, writer in writers.items()}
        group_counts = {"train": 0, "val": 0}
        pending_chars = 0
        for index, text in enumerate(group):
            split = "val" if is_validation(index, val_fraction) else "train"
            pending[split].append(text)
            group_counts[split] += 1
            pending_chars += len(text)
            if pending_chars >= ENCODE_BATCH_CHARS:
                flush()
                pending_chars = 0
        flush()
        for split in counts:
            counts[split] += group_counts[split]
        if name is not None:
            _check_split(group_counts, val_fraction, f"{source}.{name}")
            domains.append({"name": name, "documents": group_counts,
                            **{split: [first[split], writer.tokens] for split, writer in writers.items()}})
    for writer in writers.values():
        writer.close()

    _check_split(counts, val_fraction, source)
    if tokenizer_file.resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    meta = {
        "format": FORMAT_VERSION,
        "source": source,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer": "tokenizer.json",
        "tokenizer_source": str(tokenizer_file),
        "tokenizer_sha256": bpe.file_sha256(out / "tokenizer.json"),
        "val_fraction": val_fraction,
        "documents": counts,
        "tokens": {split: writer.tokens for split, writer in writers.items()},
        "shards": writers["train"].shards + writers["val"].shards,
    }
    if domains:
        meta["domains"] = domains
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _check_split(counts: dict[str, int], val_fraction: float, source: str) -> None:
    if counts["train"] == 0:
        raise UserError(f"{source}: no training documents")
    if counts["val"] == 0:
        raise UserError(
            f"{source}: the validation split is empty: val_fraction={val_fraction} holds out none of "
            f"{counts['train']} documents; raise data.val_fraction (--val-fraction) or add documents"
        )


# ---- reading a token directory -----------------------------------------------------------------------------


class TokenStream:
    """One split's shard files as a single sequence of token ids, read through memmaps."""

    def __init__(self, files: list[tuple[Path, int]], dtype: np.dtype):
        self.arrays = []
        for path, tokens in files:
            if not path.is_file():
                raise UserError(f"shard {path} listed in meta.json is missing")
            if path.stat().st_size != tokens * dtype.itemsize:
                raise UserError(
                    f"shard {path} holds {path.stat().st_size} bytes; meta.json promises {tokens} {dtype.name} tokens"
                )
            if tokens:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(tokens,)))
        self.starts = [0]
        for array in self.arrays:
            self.starts.append(self.starts[-1] + len(array))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)``, across shard boundaries where needed."""
        shard = bisect_right(self.starts, start) - 1
        pieces = []
        while length > 0:
            piece = self.arrays[shard][start - self.starts[shard] : start - self.starts[shard] + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


META_KEYS = ("dtype", "vocab_size", "eos_id", "tokenizer", "tokenizer_sha256", "shards")


def read_meta(directory: Path, setting: str) -> dict:
    """The checked ``meta.json`` of a token directory."""
    if not directory.is_dir():
        raise UserError(f"{setting}={str(directory)!r}: no such directory")
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        raise UserError(
            f"{setting}={str(directory)!r} has no meta.json; write the directory with `leantrain prepare-data`"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_file} is not valid JSON: {e}") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise UserError(f"{meta_file} lacks {', '.join(missing)}; rewrite the directory with `leantrain prepare-data`")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise UserError(f"{meta_file}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
    return meta


def split_stream(directory: Path, meta: dict, split: str) -> TokenStream:
    files = [(directory / s["file"], int(s["tokens"])) for s in meta["shards"] if s["split"] == split]
    return TokenStream(files, np.dtype(meta["dtype"]))


# ---- sampling ----------------------------------------------------------------------------------------------


def read_windows(stream: TokenStream, windows: Iterable[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, int64 ``[len(windows), seq_len]``, of the given window indices."""
    batch = torch.from_numpy(np.stack([stream.read(w * seq_len, seq_len + 1) for w in windows]).astype(np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class TokenLoader:
    """Shuffled training windows for one data-parallel rank.

    Global sample g is window ``permutation(epoch)[g % n]`` with ``epoch = g // n``. Each ``next()`` gives rank r
    the global samples ``[cursor + r*m, cursor + (r+1)*m)`` and moves the shared cursor on by ``world_size*m``.
    """

    def __init__(self, stream: TokenStream, seq_len: int, micro_batch_size: int, seed: int, rank: int, world_size: int):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        self.stream, self.seq_len, self.micro_batch_size = stream, seq_len, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = (len(stream) - 1) // seq_len
        self.cursor = 0
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len

    @property
    def epoch(self) -> int:
        return self.cursor // self.n_windows

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            rng = np.random.default_rng([self.seed % 2**64, epoch])
            self._permutations[epoch] = rng.permutation(self.n_windows)
        return self._permutations[epoch]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: ``(inputs, targets)``, int64 ``[micro_batch_size, seq_len]``."""
        first = self.cursor + self.rank * self.micro_batch_size
        samples = range(first, first + self.micro_batch_size)
        windows = [int(self._permutation(g // self.n_windows)[g % self.n_windows]) for g in samples]
        self.cursor += self.world_size * self.micro_batch_size
        return read_windows(self.stream, windows, self.seq_len)

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()

    def state_dict(self) -> dict:
        """Plain ints (safe for ``torch.load(weights_only=True)``): the cursor and what it is a cursor into."""
        return {"cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        keys = ("seed", "seq_len", "n_windows")
        changed = [f"{k} {state.get(k)} -> {mine[k]}" for k in keys if state.get(k) != mine[k]]
        if changed:
            raise UserError(
                f"the checkpoint's data position belongs to other data or sampling ({', '.join(changed)}); "
                "resume with the same data, data.seq_len and seed"
            )
        self.cursor = int(state["cursor"])

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resume from the states every rank of a run at another world size saved: the cursor is global,
        so the samples of each global step stay the same set whatever the number of ranks."""
        cursors = {int(state["cursor"]) for state in states}
        if len(cursors) != 1:
            raise UserError(f"the checkpoint's ranks stopped at different data positions {sorted(cursors)}; "
                            "it is damaged")
        self.load_state_dict(states[0])


# ---- the trainer's entry point -----------------------------------------------------------------------------


class Data:
    """A token directory opened for one data-parallel rank: vocabulary, training loader and validation batches."""

    def __init__(
        self, directory: Path, cfg: DataConfig, seed: int, rank: int, world_size: int, built_cache: bool, label: str
    ):
        meta = read_meta(directory, "data.path")
        self.directory = directory
        self.built_cache = built_cache  # this call tokenized the corpus: the first use of a cache entry
        self.seq_len, self.seed, self.rank, self.world_size = cfg.seq_len, seed, rank, world_size
        self.tokenizer_path = str(directory / meta["tokenizer"])
        if cfg.tokenizer:
            tokenizer = bpe.load_tokenizer(cfg.tokenizer, "data.tokenizer")
        else:
            tokenizer = bpe.load_tokenizer(self.tokenizer_path, "tokenizer")
        self.vocab_size = tokenizer.get_vocab_size()
        dtype = np.dtype(meta["dtype"])
        if self.vocab_size > np.iinfo(dtype).max + 1:
            raise UserError(
                f"tokenizer {cfg.tokenizer or self.tokenizer_path!r} has {self.vocab_size} tokens, more than the "
                f"{dtype.name} ids in {directory / 'meta.json'} can hold"
            )
        if cfg.tokenizer and bpe.file_sha256(Path(cfg.tokenizer).expanduser()) != meta["tokenizer_sha256"]:
            raise UserError(
                f"data.tokenizer={cfg.tokenizer!r} is not the tokenizer that wrote {directory}; leave data.tokenizer "
                "empty to use the directory's own tokenizer.json"
            )
        self.eos_id = int(meta["eos_id"])
        self.train = split_stream(directory, meta, "train")
        self.val = split_stream(directory, meta, "val")
        window = cfg.seq_len + 1
        if len(self.train) < window:
            raise UserError(
                f"{label} holds {len(self.train)} training tokens, fewer than one window of "
                f"data.seq_len + 1 = {window}; add data or lower data.seq_len"
            )
        if len(self.val) < window:
            raise UserError(
                f"the validation split of {label} holds {len(self.val)} tokens, fewer than one window of "
                f"data.seq_len + 1 = {window}; raise data.val_fraction or add data"
            )
        self.train_tokens, self.val_tokens = len(self.train), len(self.val)
        self.n_val_windows = (len(self.val) - 1) // cfg.seq_len
        # Per domain, its first validation window and how many lie wholly inside its token range.
        self.val_domains: dict[str, tuple[int, int]] = {}
        for domain in meta.get("domains", []):
            start, end = domain["val"]
            first, last = -(-start // cfg.seq_len), (end - window) // cfg.seq_len
            self.val_domains[domain["name"]] = (first, max(0, last - first + 1))
            if last < first:
                raise UserError(
                    f"the validation split of data.domains.{domain['name']} holds {end - start} tokens, fewer than "
                    f"one window of data.seq_len + 1 = {window}; raise data.val_fraction or add data"
                )

    @property
    def domain_names(self) -> list[str]:
        """The names of the data's domains (``data.domains``) in order; empty without domains."""
        return list(self.val_domains)

    def train_loader(self, micro_batch_size: int) -> TokenLoader:
        return TokenLoader(self.train, self.seq_len, micro_batch_size, self.seed, self.rank, self.world_size)

    def val_batches(self, micro_batch_size: int, max_batches: int,
                    domain: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation windows in order (of one ``domain`` if given), rank-sliced like training; the same
        batches on every call.

        Every rank gets the same number of batches: ``min(max_batches, n_val_windows // (world_size * m))``,
        or all full steps when ``max_batches <= 0``.
        """
        if domain is None:
            offset, n_windows, split = 0, self.n_val_windows, "the validation split"
        elif domain in self.val_domains:
            (offset, n_windows), split = self.val_domains[domain], f"the validation split of domain {domain!r}"
        else:
            raise ValueError(f"no domain {domain!r} in the data; domains: {self.domain_names}")
        step = self.world_size * micro_batch_size
        batches = n_windows // step
        if max_batches > 0:
            batches = min(batches, max_batches)
        if batches == 0:
            raise UserError(
                f"{split} has {n_windows} windows of data.seq_len + 1 tokens, fewer than one "
                f"batch of {step} (micro-batch {micro_batch_size} x {self.world_size} ranks); raise data.val_fraction"
            )

        def batches_of_this_rank() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for b in range(batches):
                first = offset + b * step + self.rank * micro_batch_size
                yield read_windows(self.val, range(first, first + micro_batch_size), self.seq_len)

        return batches_of_this_rank()


def build_data(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> Data:
    """Open ``cfg``'s data for data-parallel ``rank`` of ``world_size``, tokenizing and caching it on first use."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if cfg.seq_len < 1:
        raise UserError(f"data.seq_len must be positive, got {cfg.seq_len}")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.domains:
        check_domains(cfg)
    if cfg.source == "shards":
        if not cfg.path:
            raise UserError(
                "data.path is empty; with data.source=shards it names a directory written by `leantrain prepare-data`"
            )
        directory = Path(cfg.path).expanduser()
        return Data(directory, cfg, seed, rank, world_size, False, f"data.path={cfg.path!r}")
    if cfg.source in ("stdlib", "text"):
        directory, built = cached_token_dir(cfg, progress=rank == 0)
        label = "the stdlib corpus" if cfg.source == "stdlib" else f"data.path={cfg.path!r}"
        if cfg.domains:
            label = f"data.domains ({', '.join(cfg.domains)})"
        return Data(directory, cfg, seed, rank, world_size, built, f"{label} (cached in {directory})")
    raise UserError(f"data.source={cfg.source!r} is not one of {', '.join(SOURCES)}")


def check_domains(cfg: DataConfig) -> None:
    """UserError naming the key unless ``data.domains`` is a usable mapping for data.source=text."""
    if cfg.source != "text" or cfg.path:
        raise UserError(f"data.domains ({', '.join(cfg.domains)}) needs data.source=text and an empty data.path "
                        f"(each domain names its own files); got data.source={cfg.source!r}, data.path={cfg.path!r}")
    for name, spec in cfg.domains.items():
        if not DOMAIN_NAME.fullmatch(name):
            raise UserError(f"data.domains: domain name {name!r} must be letters, digits, '_', '-' or '.'")
        if not isinstance(spec, str) or not spec:
            raise UserError(f"data.domains.{name}={spec!r}: give a glob of .txt/.jsonl files, or stdlib")


Corpus = tuple[list[Path], list[str], Callable[[Path], Iterable[str]]]
"""A corpus's files, their names in the cache key, and the reader of a file's documents."""


def glob_corpus(pattern: str, setting: str, text_key: str) -> Corpus:
    files = match_files([pattern], setting)
    return files, [str(p) for p in files], lambda path: read_documents(path, text_key, setting)


def stdlib_corpus() -> Corpus:
    base, files = stdlib_files()
    return files, [p.relative_to(base).as_posix() for p in files], read_stdlib_file


# ---- the cache ---------------------------------------------------------------------------------------------


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("LEANTRAIN_CACHE") or "~/.cache/leantrain").expanduser()


def cached_token_dir(cfg: DataConfig, progress: bool) -> tuple[Path, bool]:
    """The cache entry holding ``cfg``'s stdlib or text corpus (or domains), tokenized; built first if missing.

    The entry is keyed by the file list with sizes and mtimes, the tokenizer (its hash, or the BPE vocabulary
    size to train) and the validation split, so editing any input makes a new entry. Returns it and whether
    this call built it.
    """
    python = {"python": platform.python_implementation() + platform.python_version()}
    if cfg.source == "stdlib":
        if cfg.path:
            raise UserError(
                f"data.path={cfg.path!r} is set but data.source is stdlib; set data.source to shards or text"
            )
        corpora: dict[str | None, Corpus] = {None: stdlib_corpus()}
        identity = dict(python)
        source = "stdlib"
    elif cfg.domains:
        corpora = {name: stdlib_corpus() if spec == "stdlib"
                   else glob_corpus(spec, f"data.domains.{name}", cfg.text_key) for name, spec in cfg.domains.items()}
        identity = {"text_key": cfg.text_key, **(python if "stdlib" in cfg.domains.values() else {})}
        source = "data.domains"
    else:
        corpora = {None: glob_corpus(cfg.path, "data.path", cfg.text_key)}
        identity = {"text_key": cfg.text_key}
        source = f"data.path={cfg.path!r}"
    if cfg.tokenizer:
        bpe.load_tokenizer(cfg.tokenizer, "data.tokenizer")
        identity["tokenizer_sha256"] = bpe.file_sha256(Path(cfg.tokenizer).expanduser())
    else:
        identity["bpe_vocab_size"] = cfg.vocab_size
    stats = {name: [(n, p.stat().st_size, p.stat().st_mtime_ns) for n, p in zip(names, files)]
             for name, (files, names, _) in corpora.items()}
    files_key = stats if cfg.domains else stats[None]
    key = json.dumps(
        {"format": FORMAT_VERSION, "val_fraction": cfg.val_fraction, "files": files_key, **identity}, sort_keys=True
    )
    entry = cache_root(cfg) / "data" / f"{cfg.source}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def build(out: Path) -> None:
        started = time.perf_counter()
        n_files = sum(len(files) for files, _, _ in corpora.values())
        log.info("tokenizing %s (%d files) into %s: first use", source, n_files, entry)
        if cfg.tokenizer:
            tokenizer_file = Path(cfg.tokenizer).expanduser()
        else:
            train_texts = (
                text for files, _, read in corpora.values()
                for i, text in enumerate(corpus_documents(files, read)) if not is_validation(i, cfg.val_fraction)
            )
            tokenizer_file = out / "tokenizer.json"
            bpe.train_bpe(train_texts, cfg.vocab_size).save(str(tokenizer_file))
        total = sum(size for corpus_stats in stats.values() for _, size, _ in corpus_stats)
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True) as bar:
            documents = {name: corpus_documents(files, read, bar) for name, (files, _, read) in corpora.items()}
            write_token_dir(documents if cfg.domains else documents[None], tokenizer_file, out, cfg.val_fraction,
                            DEFAULT_SHARD_TOKENS, source)
        log.info("tokenized %s in %.1f s", source, time.perf_counter() - started)

    return entry, build_once(entry, build)


def build_once(entry: Path, build: Callable[[Path], None]) -> bool:
    """Make sure the directory ``entry`` exists, complete, calling ``build(tmp_dir)`` at most once across processes.

    A lock file serialises builders, and the result appears by an atomic rename, so a reader without the lock
    sees either no entry or a whole one. Returns whether this call built it.
    """
    if (entry / "meta.json").is_file():
        return False
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "meta.json").is_file():
            return False
        if entry.exists():  # not ours to explain (no builder leaves one); rebuild rather than trust it
            shutil.rmtree(entry)
        tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            build(tmp)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


# ---- leantrain prepare-data --------------------------------------------------------------------------------


def prepare_data(
    inputs: str | list[str],
    tokenizer: str,
    out: str,
    text_key: str = "text",
    val_fraction: float = 0.02,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = False,
) -> dict:
    """Tokenize local text/JSONL files (globs) into the token directory ``out`` for ``data.source=shards``.

    Writes train and val shards, a copy of the tokenizer and ``meta.json``; returns the metadata. ``out`` must
    not exist or be empty; it appears only once complete.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out!r} already exists and is not empty; choose a new directory")
    tokenizer_file = Path(tokenizer).expanduser()
    bpe.load_tokenizer(tokenizer_file, "--tokenizer")
    files = match_files([inputs] if isinstance(inputs, str) else list(inputs), "INPUT_GLOB")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        total = sum(p.stat().st_size for p in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True) as bar:
            documents = corpus_documents(files, lambda p: read_documents(p, text_key, "INPUT_GLOB"), bar)
            meta = write_token_dir(documents, tokenizer_file, tmp, val_fraction, shard_tokens, f"INPUT_GLOB {inputs!r}")
        os.replace(tmp, out_dir)  # an existing empty out_dir is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def prepare_data_main(argv: list[str]) -> int:
    """``leantrain prepare-data INPUT_GLOB... --tokenizer PATH --out DIR``: the CLI front of ``prepare_data``."""
    parser = argparse.ArgumentParser(
        prog="leantrain prepare-data",
        description="Tokenize local .txt/.jsonl files into uint16/uint32 token shards for data.source=shards.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT_GLOB", help="files or globs (quote them; ** recurses)")
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help="a HF tokenizer.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty output directory")
    parser.add_argument("--text-key", default="text", metavar="K", help="JSONL field holding the text (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.02, metavar="F", help="share of documents held out")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N", help="tokens per shard")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    meta = prepare_data(
        args.inputs, args.tokenizer, args.out, args.text_key, args.val_fraction, args.shard_tokens, progress=True
    )
    print(
        f"wrote {args.out}: {meta['tokens']['train']:,} train tokens in {meta['documents']['train']:,} documents, "
        f"{meta['tokens']['val']:,} validation tokens in {meta['documents']['val']:,} documents, "
        f"{len(meta['shards'])} {meta['dtype']} shards, vocabulary {meta['vocab_size']:,}, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0
