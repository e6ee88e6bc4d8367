"""Shared fixtures: a small local corpus and a fast tiny-model configuration for end-to-end runs."""

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with one reason, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_glob(tmp_path_factory) -> str:
    """About 300 KB of text: a fixed set of the standard library's modules, copied as .txt files."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "ast.py", "bisect.py", "calendar.py", "csv.py", "dataclasses.py",
                 "difflib.py", "fractions.py", "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py",
                 "pprint.py", "random.py", "shlex.py", "statistics.py", "string.py", "textwrap.py"):
        shutil.copy(stdlib / name, out / (name.replace("/", "_") + ".txt"))
    return str(out / "*.txt")


@pytest.fixture(scope="session")
def prose_glob(tmp_path_factory) -> str:
    """About 220 KB of English prose: 40 topics of the Python language reference (pydoc_data), as .txt files."""
    from pydoc_data.topics import topics

    out = tmp_path_factory.mktemp("prose")
    for name in sorted(topics)[:40]:
        (out / f"{name}.txt").write_text(topics[name])
    return str(out / "*.txt")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session, so the tokenizer is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_overrides(corpus_glob, cache_dir, tmp_path) -> list[str]:
    """A model and batch small enough for a step in a few milliseconds on one core."""
    return [
        "model.preset=tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.intermediate_size=128", "data.source=text", f"data.path={corpus_glob}", "data.vocab_size=512", "data.val_fraction=0.2",
        "data.seq_len=32", f"data.cache_dir={cache_dir}", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", "trainer.dtype=fp32", "trainer.eval_interval=5", "trainer.eval_batches=2",
        "trainer.max_steps=10", "optim.warmup_steps=2", "logging.progress=false", f"trainer.run_dir={tmp_path / 'run'}",
        # The plan of this model is a few MiB; tests/trainer/test_memory_check.py runs the check.
        "trainer.memory_check=false",
    ]


@pytest.fixture
def one_thread():
    """One intra-op thread, as each spawned rank runs: on a loaded 2-core machine two OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
