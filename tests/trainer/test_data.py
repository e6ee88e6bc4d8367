"""Data loading: sampling against closed forms, rank slicing, resume, the three sources, the cache and errors."""

import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from leantrain.errors import UserError
from leantrain.trainer import data as data_module
from leantrain.trainer import tokenizer as bpe
from leantrain.trainer.data import DataConfig, build_data, prepare_data, prepare_data_main

WORDS = "alpha beta gamma delta lambda yield return class import print value tensor token merge shard".split()
SEQ = 8  # seq_len of the synthetic shards
TRAIN_SHARDS = (600, 401)  # token counts of the synthetic train shards: 1000 // SEQ = 125 windows
VAL_TOKENS = 81  # 80 // SEQ = 10 validation windows
VAL_OFFSET = 5000  # synthetic val token ids start here, so no id appears in both splits


def synthetic_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer with ids 0..vocab_size-2 and the end-of-text token last."""
    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {bpe.EOS_TOKEN: vocab_size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(path))
    return path


def write_synthetic_shards(directory: Path) -> Path:
    """A token directory written by hand, not by the code under test: token k of the train stream is k."""
    directory.mkdir()
    tokenizer = synthetic_tokenizer(directory / "tokenizer.json", 6000)
    shards, start = [], 0
    for i, n in enumerate(TRAIN_SHARDS):
        np.arange(start, start + n, dtype=np.uint16).tofile(directory / f"train_{i:05d}.bin")
        shards.append({"file": f"train_{i:05d}.bin", "split": "train", "tokens": n})
        start += n
    np.arange(VAL_OFFSET, VAL_OFFSET + VAL_TOKENS, dtype=np.uint16).tofile(directory / "val_00000.bin")
    shards.append({"file": "val_00000.bin", "split": "val", "tokens": VAL_TOKENS})
    meta = {
        "dtype": "uint16",
        "vocab_size": 6000,
        "eos_id": 5999,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": bpe.file_sha256(tokenizer),
        "shards": shards,
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_synthetic_shards(tmp_path / "shards")


def shard_data(directory: Path, seed: int = 0, rank: int = 0, world_size: int = 1, **cfg) -> data_module.Data:
    return build_data(DataConfig(source="shards", path=str(directory), seq_len=SEQ, **cfg), seed, rank, world_size)


def windows_of(inputs: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Window indices of a synthetic batch, checking each row is the closed form arange(w*SEQ, w*SEQ + SEQ)."""
    windows = (inputs[:, 0] // SEQ).tolist()
    for w, x, y in zip(windows, inputs, targets):
        expected = torch.arange(w * SEQ, w * SEQ + SEQ + 1)
        assert torch.equal(x, expected[:-1]) and torch.equal(y, expected[1:])
    return windows


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    bpe.train_bpe(documents(40, seed=99), vocab_size=300).save(str(path))
    return path


@pytest.fixture
def text_corpus(tmp_path: Path) -> tuple[str, list[str]]:
    """Two .txt files and a .jsonl file under tmp_path/corpus; returns the glob and the documents in read order."""
    root = tmp_path / "corpus"
    root.mkdir()
    docs = documents(14, seed=1)
    (root / "a.txt").write_text(docs[0])
    with (root / "b.jsonl").open("w") as f:
        for doc in docs[1:13]:
            f.write(json.dumps({"text": doc, "id": 7}) + "\n\n")  # blank lines between records are skipped
    (root / "c.txt").write_text(docs[13])
    return str(root / "*"), docs


def expected_stream(docs: list[str], tokenizer: Tokenizer, eos_id: int, val: bool, every: int = 4) -> list[int]:
    """Reference token stream: with val_fraction = 1/every, document i is held out iff i % every == every - 1."""
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if (i % every == every - 1) == val:
            ids += tokenizer.encode(doc, add_special_tokens=False).ids + [eos_id]
    return ids


# ---- sampling ----------------------------------------------------------------------------------------------


def test_epoch_is_a_seeded_permutation_of_closed_form_windows(shards):
    loader = shard_data(shards).train_loader(5)
    assert loader.tokens_per_sample == SEQ and loader.n_windows == 125
    epochs = [[w for _ in range(25) for w in windows_of(*loader.next())] for _ in range(2)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(125))
    assert epochs[0] != epochs[1]  # reshuffled each epoch

    again = shard_data(shards).train_loader(5)
    assert [w for _ in range(25) for w in windows_of(*again.next())] == epochs[0]
    other_seed = shard_data(shards, seed=1).train_loader(5)
    assert [w for _ in range(25) for w in windows_of(*other_seed.next())] != epochs[0]


def test_epoch_wrap_inside_a_batch(shards):
    data = shard_data(shards)
    single = data.train_loader(1)
    reference = [windows_of(*single.next())[0] for _ in range(2 * 125 + 30)]
    loader = data.train_loader(7)  # 125 is not a multiple of 7: batches 17 and 35 straddle epochs
    got = [w for _ in range(40) for w in windows_of(*loader.next())]
    assert got == reference[: 40 * 7]
    assert loader.epoch == 2 and loader.cursor == 280


def test_two_ranks_read_what_one_rank_reads_at_twice_the_micro_batch(shards):
    one = shard_data(shards).train_loader(6)
    ranks = [shard_data(shards, rank=r, world_size=2).train_loader(3) for r in range(2)]
    seen = []
    for _ in range(30):  # crosses an epoch boundary
        x0, y0 = ranks[0].next()
        x1, y1 = ranks[1].next()
        x, y = one.next()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        w0, w1 = windows_of(x0, y0), windows_of(x1, y1)
        assert not set(w0) & set(w1)
        seen += w0 + w1
    assert sorted(seen[:125]) == list(range(125))  # together the ranks cover the epoch exactly once


def test_resume_continues_at_the_next_sample(shards, tmp_path):
    data = shard_data(shards)
    loader = data.train_loader(4)
    for _ in range(7):
        loader.next()
    torch.save(loader.state_dict(), tmp_path / "loader.pt")
    state = torch.load(tmp_path / "loader.pt", weights_only=True)
    expected = [loader.next() for _ in range(40)]  # runs into the next epoch

    resumed = data.train_loader(4)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((resumed.next() for _ in range(40)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)

    # The cursor is global: two ranks at micro-batch 2 resume where one rank at 4 stopped.
    halves = [shard_data(shards, rank=r, world_size=2).train_loader(2) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    x0, _ = halves[0].next()
    x1, _ = halves[1].next()
    assert torch.equal(torch.cat([x0, x1]), expected[0][0])

    # At another world size every rank gets all the saved ranks' states: the same cursor, taken once.
    for half in halves:
        half.load_state_dicts([state, state])
    assert torch.equal(torch.cat([halves[0].next()[0], halves[1].next()[0]]), expected[0][0])
    with pytest.raises(UserError, match="different data positions"):
        halves[0].load_state_dicts([state, {**state, "cursor": 0}])

    with pytest.raises(UserError, match="seq_len"):
        build_data(DataConfig(source="shards", path=str(shards), seq_len=4), 0).train_loader(4).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        shard_data(shards, seed=3).train_loader(4).load_state_dict(state)


def test_validation_batches_are_ordered_fixed_and_rank_sliced(shards):
    data = shard_data(shards)
    assert data.n_val_windows == 10
    batches = list(data.val_batches(2, max_batches=0))
    assert len(batches) == 5
    for b, (x, y) in enumerate(batches):
        stream = torch.arange(VAL_OFFSET + b * 2 * SEQ, VAL_OFFSET + (b + 1) * 2 * SEQ + 1)
        assert torch.equal(x[0], stream[:SEQ]) and torch.equal(y[1], stream[SEQ + 1 :])
    again = list(data.val_batches(2, max_batches=3))
    assert len(again) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))

    ranks = [list(shard_data(shards, rank=r, world_size=2).val_batches(1, 0)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    for (x0, _), (x1, _), (x, _) in zip(*ranks, batches):
        assert torch.equal(torch.cat([x0, x1]), x)
    with pytest.raises(UserError, match="data.val_fraction"):
        data.val_batches(11, 1)


# ---- sources -----------------------------------------------------------------------------------------------


def test_prepare_data_round_trip(text_corpus, trained_tokenizer, tmp_path):
    pattern, docs = text_corpus
    out = tmp_path / "prepared"
    out.mkdir()  # an empty directory may be filled
    meta = prepare_data(pattern, str(trained_tokenizer), str(out), val_fraction=0.25, shard_tokens=300)
    tokenizer = Tokenizer.from_file(str(trained_tokenizer))
    eos = tokenizer.token_to_id(bpe.EOS_TOKEN)
    train, val = expected_stream(docs, tokenizer, eos, False), expected_stream(docs, tokenizer, eos, True)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == eos and meta["vocab_size"] == tokenizer.get_vocab_size()
    assert meta["documents"] == {"train": 11, "val": 3} and meta["tokens"] == {"train": len(train), "val": len(val)}
    train_shards = [s for s in meta["shards"] if s["split"] == "train"]
    assert len(train_shards) == -(-len(train) // 300) and all(s["tokens"] == 300 for s in train_shards[:-1])
    assert (out / "tokenizer.json").read_bytes() == trained_tokenizer.read_bytes()

    data = build_data(DataConfig(source="shards", path=str(out), seq_len=16), seed=0)
    assert data.vocab_size == tokenizer.get_vocab_size() and data.eos_id == eos
    assert data.train.read(0, len(train)).tolist() == train  # reads across the 300-token shard boundaries
    assert data.val.read(0, len(val)).tolist() == val
    loader = data.train_loader(1)
    got = sorted(tuple(torch.cat([x[0], y[0, -1:]]).tolist()) for x, y in (loader.next() for _ in range(loader.n_windows)))
    n = (len(train) - 1) // 16
    assert got == sorted(tuple(train[w * 16 : w * 16 + 17]) for w in range(n))

    # The tokenizer given again must be the one that wrote the shards.
    other = tmp_path / "other.json"
    bpe.train_bpe(documents(10, seed=5), vocab_size=280).save(str(other))
    with pytest.raises(UserError, match="data.tokenizer"):
        build_data(DataConfig(source="shards", path=str(out), seq_len=16, tokenizer=str(other)), seed=0)


def test_prepare_data_cli(text_corpus, trained_tokenizer, tmp_path, capsys):
    pattern, _ = text_corpus
    out = tmp_path / "cli"
    argv = [pattern, "--tokenizer", str(trained_tokenizer), "--out", str(out), "--val-fraction", "0.25"]
    assert prepare_data_main(argv) == 0
    summary = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert f"{meta['tokens']['train']:,} train tokens" in summary and "uint16" in summary
    with pytest.raises(UserError, match="--out"):
        prepare_data_main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli", "corpus"]  # no temporary directory left behind


def test_text_source_with_a_given_tokenizer(text_corpus, trained_tokenizer, tmp_path):
    pattern, docs = text_corpus
    cfg = DataConfig(source="text", path=pattern, tokenizer=str(trained_tokenizer), seq_len=16, val_fraction=0.25,
                     cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, seed=0)
    tokenizer = Tokenizer.from_file(str(trained_tokenizer))
    eos = tokenizer.token_to_id(bpe.EOS_TOKEN)
    train = expected_stream(docs, tokenizer, eos, False)
    assert data.built_cache and data.train.read(0, data.train_tokens).tolist() == train
    assert data.val.read(0, data.val_tokens).tolist() == expected_stream(docs, tokenizer, eos, True)


def test_text_source_trains_a_lossless_bpe_and_reuses_the_cache(text_corpus, tmp_path, monkeypatch):
    pattern, docs = text_corpus
    cfg = DataConfig(source="text", path=pattern, vocab_size=300, seq_len=16, val_fraction=0.25,
                     cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, seed=0)
    assert data.built_cache and data.vocab_size == 300
    tokenizer = Tokenizer.from_file(data.tokenizer_path)
    assert tokenizer.token_to_id(bpe.EOS_TOKEN) == data.eos_id
    ids = data.train.read(0, data.train_tokens)
    assert ids[-1] == data.eos_id
    cuts = np.flatnonzero(ids == data.eos_id)
    decoded = [tokenizer.decode(part.tolist()) for part in np.split(ids, cuts + 1)[:-1]]
    assert [d.removesuffix(bpe.EOS_TOKEN) for d in decoded] == [d for i, d in enumerate(docs) if i % 4 != 3]

    # A second build reads the cache: no tokenizer training, no rewrite, the same batches.
    stamp = (Path(data.directory) / "meta.json").stat().st_mtime_ns
    monkeypatch.setattr(bpe, "train_bpe", lambda *a, **k: pytest.fail("retrained a cached tokenizer"))
    again = build_data(cfg, seed=0)
    assert not again.built_cache and again.directory == data.directory
    assert (Path(data.directory) / "meta.json").stat().st_mtime_ns == stamp
    assert torch.equal(again.train_loader(2).next()[0], data.train_loader(2).next()[0])

    # Editing an input makes a new entry.
    monkeypatch.undo()
    with (Path(pattern).parent / "c.txt").open("a") as f:
        f.write("one more line\n")
    edited = build_data(cfg, seed=0)
    assert edited.built_cache and edited.directory != data.directory


BUILDER = """
import json, sys, time
from pathlib import Path
from leantrain.trainer.data import DataConfig, build_data
me, other = Path(sys.argv[1]), Path(sys.argv[2])
me.touch()
deadline = time.time() + 60
while not other.exists() and time.time() < deadline:  # start building together
    time.sleep(0.002)
cfg = DataConfig(source="text", path=sys.argv[3], cache_dir=sys.argv[4], vocab_size=300, seq_len=16, val_fraction=0.25)
data = build_data(cfg, seed=0)
print(json.dumps({"built": data.built_cache, "dir": str(data.directory), "batch": data.train_loader(2).next()[0].tolist()}))
"""


def test_concurrent_builders_leave_one_valid_cache(text_corpus, tmp_path):
    pattern, _ = text_corpus
    cache = tmp_path / "cache"
    flags = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(flags[i]), str(flags[1 - i]), pattern, str(cache)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["dir"] == results[1]["dir"] and results[0]["batch"] == results[1]["batch"]
    entry = Path(results[0]["dir"])
    assert sorted(p.name for p in (cache / "data").iterdir()) == [entry.name, entry.name + ".lock"]
    assert (entry / "meta.json").is_file()


def test_stdlib_corpus_is_sorted_files_and_cached(tmp_path):
    cfg = DataConfig(seq_len=64, cache_dir=str(tmp_path / "cache"))
    started = time.perf_counter()
    data = build_data(cfg, seed=0)
    first_build = time.perf_counter() - started
    started = time.perf_counter()
    again = build_data(cfg, seed=0)
    cached_build = time.perf_counter() - started
    assert data.built_cache and not again.built_cache
    assert cached_build < first_build / 3, (first_build, cached_build)

    # Independent listing: non-empty .py files outside test/IDLE/site-packages trees, sorted by relative path.
    root = sysconfig.get_paths()["stdlib"]
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__"}
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skipped]
        rel = os.path.relpath(folder, root)
        files += [os.path.normpath(os.path.join(rel, n)).replace(os.sep, "/") for n in names if n.endswith(".py")]
    texts = [Path(root, f).read_text("utf-8", errors="replace") for f in sorted(files)]
    texts = [t for t in texts if t.strip()]
    meta = json.loads((Path(data.directory) / "meta.json").read_text())
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(texts) > 500
    assert data.vocab_size == 8192 and data.train_tokens > 1_000_000

    tokenizer = Tokenizer.from_file(data.tokenizer_path)
    head = data.train.read(0, 20_000)
    first_doc = head[: np.flatnonzero(head == data.eos_id)[0]]
    assert tokenizer.decode(first_doc.tolist()) == texts[0]
    x, y = data.train_loader(4).next()
    assert x.shape == (4, 64) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


# ---- errors ------------------------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path, shards):
    with pytest.raises(UserError, match="data.source='web'"):
        build_data(DataConfig(source="web"), 0)
    with pytest.raises(UserError, match="data.path is empty"):
        build_data(DataConfig(source="shards"), 0)
    with pytest.raises(UserError, match="data.path is empty"):
        build_data(DataConfig(source="text", cache_dir=str(tmp_path)), 0)
    with pytest.raises(UserError, match="data.path=.*no such directory"):
        build_data(DataConfig(source="shards", path=str(tmp_path / "absent")), 0)
    with pytest.raises(UserError, match="data.val_fraction"):
        shard_data(shards, val_fraction=1.0)
    with pytest.raises(UserError, match="data.seq_len"):
        build_data(DataConfig(source="shards", path=str(shards), seq_len=0), 0)
    with pytest.raises(UserError, match="data.vocab_size"):
        bpe.train_bpe(["x"], vocab_size=100)
    with pytest.raises(UserError, match="data.path=.*source is stdlib"):
        build_data(DataConfig(path="x", cache_dir=str(tmp_path)), 0)


def test_shard_directory_errors(tmp_path, shards):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no meta.json"):
        build_data(DataConfig(source="shards", path=str(empty)), 0)
    with pytest.raises(UserError, match="data.tokenizer=.*no such tokenizer"):
        shard_data(shards, tokenizer=str(tmp_path / "missing.json"))
    big = synthetic_tokenizer(tmp_path / "big.json", 70_000)
    with pytest.raises(UserError, match="70000 tokens, more than the uint16"):
        shard_data(shards, tokenizer=str(big))
    with pytest.raises(UserError, match="one window of data.seq_len"):
        build_data(DataConfig(source="shards", path=str(shards), seq_len=1001), 0)
    with pytest.raises(UserError, match="validation split"):
        build_data(DataConfig(source="shards", path=str(shards), seq_len=100), 0)
    with (shards / "train_00001.bin").open("r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="train_00001.bin holds 10 bytes"):
        shard_data(shards)


def test_text_errors_name_the_file(tmp_path, trained_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cfg = dict(source="text", tokenizer=str(trained_tokenizer), seq_len=16, val_fraction=0.25, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="matches nothing"):
        build_data(DataConfig(path=str(corpus / "*.jsonl"), **cfg), 0)
    with pytest.raises(UserError, match="is a directory"):
        build_data(DataConfig(path=str(corpus), **cfg), 0)
    (corpus / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty.txt is empty"):
        build_data(DataConfig(path=str(corpus / "*.txt"), **cfg), 0)
    (corpus / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 has no string field 'text'"):
        build_data(DataConfig(path=str(corpus / "bad.jsonl"), **cfg), 0)
    (corpus / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(UserError, match=r"broken.jsonl:2 is not valid JSON"):
        build_data(DataConfig(path=str(corpus / "broken.jsonl"), **cfg), 0)
    (corpus / "small.txt").write_text("a few words only")
    (corpus / "other.txt").write_text("and a few more")
    with pytest.raises(UserError, match="validation split is empty"):
        build_data(DataConfig(path=str(corpus / "[so]*.txt"), **{**cfg, "val_fraction": 0.1}), 0)
    with pytest.raises(UserError, match="fewer than one window"):
        build_data(DataConfig(path=str(corpus / "[so]*.txt"), **{**cfg, "val_fraction": 0.5}), 0)
    assert not [p for p in (tmp_path / "data").iterdir() if ".tmp-" in p.name]  # failed builds leave nothing


def test_prepare_data_errors(tmp_path, text_corpus, trained_tokenizer):
    pattern, _ = text_corpus
    with pytest.raises(UserError, match="--tokenizer=.*no such tokenizer"):
        prepare_data(pattern, str(tmp_path / "nope.json"), str(tmp_path / "out"))
    no_eos = tmp_path / "no_eos.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(no_eos))
    with pytest.raises(UserError, match="no end-of-text token"):
        prepare_data(pattern, str(no_eos), str(tmp_path / "out"))
    with pytest.raises(UserError, match="INPUT_GLOB"):
        prepare_data(str(tmp_path / "none*.txt"), str(trained_tokenizer), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "no_eos.json"]  # nothing half-written


# ---- bad data through the CLI ---------------------------------------------------------------------------------


def bad_data(root: Path) -> dict[str, tuple[str, str]]:
    """Broken corpora: name -> (data.path, what the one-line error must say)."""
    root.mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text(" \n\t\n")
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    lines = [json.dumps({"text": f"record {i}"}).encode() for i in range(1000)]  # past text IO's 8 KiB buffer
    (root / "latin1.jsonl").write_bytes(b"\n".join([*lines, b'{"text": "na\xefve"}']) + b"\n")
    (root / "binary.bin").write_bytes(bytes(range(128, 256)))
    (root / "no_text").mkdir()
    (root / "no_text" / "weights.bin").write_bytes(b"\0\1")
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "deeper" / "notes.txt").write_text("some notes")
    jsonl_offset = sum(len(line) + 1 for line in lines) + len(b'{"text": "na')
    return {
        "missing file": (f"{root}/missing.txt", f"data.path='{root}/missing.txt': no such file"),
        "missing folder": (f"{root}/absent/*.txt", f"data.path='{root}/absent/*.txt': no such file"),
        "empty file": (f"{root}/empty.txt", f"{root}/empty.txt is empty"),
        "whitespace only": (f"{root}/blank.txt", f"{root}/blank.txt holds only whitespace"),
        "latin-1 text": (f"{root}/latin1.txt", f"{root}/latin1.txt is not UTF-8 text: byte 0xe9 at offset 3 (line 1)"),
        "latin-1 jsonl": (f"{root}/latin1.jsonl",
                          f"{root}/latin1.jsonl is not UTF-8 text: byte 0xef at offset {jsonl_offset} (line 1001)"),
        "binary file": (f"{root}/*.bin", f"{root}/binary.bin is not UTF-8 text: byte 0x80 at offset 0"),
        "folder without text": (f"{root}/no_text", f"data.path='{root}/no_text' is a directory with no .txt or .jsonl"),
        "folder with text": (f"{root}/nested", f"is a directory; give a glob of its files, e.g. {root}/nested/**/*.txt"),
    }


def run_cli(args: list[str], capsys) -> str:
    """``leantrain ARGS`` in this process: it must exit 2 with one line on stderr; returns that line."""
    from leantrain.trainer.cli import main

    assert main(args) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leantrain: error: "), out.err
    return lines[0]


def test_bad_text_data_exits_2_naming_the_path_and_caches_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    for name, (path, expected) in bad_data(tmp_path / "corpus").items():
        error = run_cli(["train", "quickstart", "data.source=text", f"data.path={path}", "data.vocab_size=300",
                         f"data.cache_dir={cache}", f"trainer.run_dir={tmp_path / 'run'}"], capsys)
        assert expected in error, name
    assert not (cache / "data").exists() or not [p for p in (cache / "data").iterdir() if not p.name.endswith(".lock")]
    assert not (tmp_path / "run").exists()


def test_bad_data_of_prepare_data_and_shards_exits_2_naming_the_path(tmp_path, capsys, trained_tokenizer):
    cases = bad_data(tmp_path / "corpus")
    for name in ("missing file", "empty file", "latin-1 jsonl", "folder without text"):
        path, expected = cases[name]
        error = run_cli(["prepare-data", path, "--tokenizer", str(trained_tokenizer), "--out", str(tmp_path / "out")],
                        capsys)
        assert expected.replace("data.path", "INPUT_GLOB") in error, name
        assert not (tmp_path / "out").exists()
    error = run_cli(["train", "quickstart", "data.source=shards", f"data.path={tmp_path / 'absent'}"], capsys)
    assert f"data.path='{tmp_path / 'absent'}': no such directory" in error
    error = run_cli(["train", "quickstart", "data.source=shards", f"data.path={tmp_path / 'corpus' / 'no_text'}"],
                    capsys)
    assert f"data.path='{tmp_path / 'corpus' / 'no_text'}' has no meta.json" in error


def test_a_corpus_shorter_than_one_sequence_names_path_tokens_and_seq_len(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a short corpus")
    (corpus / "b.txt").write_text("and another short one")
    args = ["train", "quickstart", "data.source=text", f"data.path={corpus}/*.txt", "data.vocab_size=300",
            "data.val_fraction=0.5", f"data.cache_dir={tmp_path / 'cache'}", f"trainer.run_dir={tmp_path / 'run'}"]
    first = run_cli(args, capsys)
    assert f"data.path='{corpus}/*.txt'" in first
    assert re.search(r"holds \d+ training tokens, fewer than one window of data.seq_len \+ 1 = 257", first), first
    # The tokenized corpus is cached (it is valid data, reused at a smaller data.seq_len); the cache does not
    # hide the error from the next run.
    assert run_cli(args, capsys) == first


def test_unreadable_file_is_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("text")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(UserError, match=f"data.path: cannot read {path}: Permission denied"):
        list(data_module.read_documents(path, "text", "data.path"))
