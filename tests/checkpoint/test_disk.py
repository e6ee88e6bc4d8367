"""Crash safety, integrity checks and safe loading of checkpoint files (leantrain.checkpoint.disk)."""

import hashlib
import json
import os
import shlex
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from leantrain.checkpoint import disk
from leantrain.checkpoint.disk import (
    CheckpointError,
    find_checkpoints,
    latest_good_checkpoint,
    load_checkpoint,
    prune,
    repair,
    save_checkpoint,
    write_final_weights,
)
from leantrain.errors import UserError


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN payloads and -0.0 count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_tree(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert bitwise_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def nested_state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    floats = torch.randn(5, 3, generator=generator)
    floats[0, 0] = float("nan")
    floats[0, 1] = -0.0
    return {
        "model": OrderedDict(
            weight=floats,
            bf16=torch.randn(4, 4, generator=generator).to(torch.bfloat16),
            half=torch.randn(3, generator=generator).half(),
            transposed=torch.randn(3, 2, generator=generator).t(),
        ),
        "optimizer": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(2, generator=generator)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "foreach": None, "fused": False}],
        },
        "rng": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=generator),
        "tokens": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "position": {"epoch": 2, "index": 12345, "name": "shard-0001", "progress": 0.25},
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
    }


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_is_bitwise_and_records_checksums(tmp_path):
    state = nested_state(0)
    path = save_checkpoint(tmp_path, 3, {"replicated": state, "rank_0": {"x": torch.ones(2)}}, {"fp": {"a": 1}})

    assert path == tmp_path / "step_3"
    assert (tmp_path / "latest").read_text().strip() == "step_3"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "rank_0.pt", "replicated.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    meta = json.loads((path / "meta.json").read_text())
    for name in ("replicated", "rank_0"):
        file = path / f"{name}.pt"
        assert meta["files"][name] == {"size": file.stat().st_size, "sha256": sha256_of(file)}

    content, payloads = load_checkpoint(path)
    assert content["step"] == 3 and content["meta"] == {"fp": {"a": 1}}
    assert_same_tree(payloads["replicated"], state)
    _, only_rank = load_checkpoint(path, names=["rank_0"])
    assert list(only_rank) == ["rank_0"]


def test_unloadable_types_are_refused_before_anything_is_written(tmp_path):
    class Custom:
        pass

    with pytest.raises(TypeError, match=r"model\.extra is a Custom"):
        save_checkpoint(tmp_path, 1, {"model": {"extra": Custom()}}, {})
    with pytest.raises(TypeError, match="defaultdict"):
        from collections import defaultdict

        save_checkpoint(tmp_path, 1, {"model": {"state": defaultdict(int)}}, {})
    assert list(tmp_path.iterdir()) == []


def test_crash_in_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"a": {"x": torch.zeros(3)}, "b": {"y": torch.ones(3)}}, {})
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"a": {"x": torch.full((3,), 2.0)}, "b": {"y": torch.ones(3)}}, {})

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step_")] == ["step_1"]
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert latest_good_checkpoint(tmp_path) == tmp_path / "step_1"
    _, payloads = load_checkpoint(tmp_path / "step_1")
    assert torch.equal(payloads["a"]["x"], torch.zeros(3))


def test_crash_in_rename_leaves_latest_on_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"a": {"x": torch.zeros(3)}}, {})
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".tmp-step_"):
            raise OSError("power cut")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, 2, {"a": {"x": torch.ones(3)}}, {})
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert not (tmp_path / "step_2").exists()
    # Re-saving an existing step must also fail without losing it.
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, 1, {"a": {"x": torch.ones(3)}}, {})
    monkeypatch.setattr(os, "rename", real_rename)

    assert find_checkpoints(tmp_path) == [tmp_path / "step_1"]
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    _, payloads = load_checkpoint(tmp_path / "step_1")
    assert torch.equal(payloads["a"]["x"], torch.zeros(3))


def test_killed_save_leftovers_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, {"a": {"x": torch.zeros(3)}}, {})
    leftover = tmp_path / ".tmp-step_2-deadbeef"
    leftover.mkdir()
    (leftover / "a.pt").write_bytes(b"partial")

    assert find_checkpoints(tmp_path) == [tmp_path / "step_1"]
    assert latest_good_checkpoint(tmp_path) == tmp_path / "step_1"
    save_checkpoint(tmp_path, 2, {"a": {"x": torch.ones(3)}}, {})
    assert not leftover.exists()


def test_resave_of_a_step_replaces_it_and_interrupted_replace_is_repaired(tmp_path):
    save_checkpoint(tmp_path, 5, {"a": {"x": torch.zeros(2)}}, {"version": "old"})
    save_checkpoint(tmp_path, 5, {"a": {"x": torch.ones(2)}}, {"version": "new"})
    content, payloads = load_checkpoint(tmp_path / "step_5")
    assert content["meta"] == {"version": "new"} and torch.equal(payloads["a"]["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_5"]

    # A kill between moving the old step_5 aside and renaming the new one in: repair puts it back.
    os.rename(tmp_path / "step_5", tmp_path / ".superseded-step_5-0123abcd")
    (tmp_path / ".tmp-step_5-0123abcd").mkdir()
    repair(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_5"]
    assert load_checkpoint(tmp_path / "step_5")[0]["meta"] == {"version": "new"}


def test_find_checkpoints_orders_by_step_number(tmp_path):
    for step in (2, 10, 1):
        save_checkpoint(tmp_path, step, {"a": {"step": step}}, {})
    (tmp_path / "step_x").mkdir()
    (tmp_path / "notes").write_text("hi")
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_10", "step_2", "step_1"]
    assert find_checkpoints(tmp_path / "absent") == []


def two_checkpoints(tmp_path) -> Path:
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.arange(4096.0)}}, {})
    save_checkpoint(tmp_path, 2, {"model": {"w": torch.arange(4096.0) + 1}}, {})
    return tmp_path / "step_2" / "model.pt"


def test_truncated_file_is_reported_and_skipped(tmp_path):
    damaged = two_checkpoints(tmp_path)
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match=f"{damaged}.*truncated") as raised:
        load_checkpoint(tmp_path / "step_2")
    assert isinstance(raised.value, UserError)
    with pytest.warns(UserWarning, match="step_2"):
        assert latest_good_checkpoint(tmp_path) == tmp_path / "step_1"


def test_bit_flip_is_reported_and_skipped(tmp_path):
    damaged = two_checkpoints(tmp_path)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=f"{damaged}.*SHA-256"):
        load_checkpoint(tmp_path / "step_2")
    with pytest.warns(UserWarning, match="step_2"):
        assert latest_good_checkpoint(tmp_path) == tmp_path / "step_1"


def test_damaged_meta_and_missing_checkpoint(tmp_path):
    two_checkpoints(tmp_path)
    meta = tmp_path / "step_2" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(CheckpointError, match="meta.json is damaged"):
        load_checkpoint(tmp_path / "step_2")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "step_9")
    with pytest.raises(CheckpointError, match="has no meta.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no payload 'optim'"):
        load_checkpoint(tmp_path / "step_1", names=["optim"])
    meta = tmp_path / "step_1" / "meta.json"
    content = json.loads(meta.read_text())
    content["files"]["../step_2/model"] = content["files"].pop("model")
    meta.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_checkpoint(tmp_path / "step_1")


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    path = save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}}, {})
    # An attacker who can write the directory also rewrites meta.json: only weights_only stands.
    evil = path / "model.pt"
    torch.save({"w": Exploit()}, evil)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["model"] = {"size": evil.stat().st_size, "sha256": sha256_of(evil)}
    (path / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(CheckpointError, match=f"{evil}.*refusing to unpickle.*system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_prune_keeps_newest_intact_and_latest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"a": {"x": torch.full((8,), float(step))}}, {})
    prune(tmp_path, keep=2)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_5", "step_4"]

    # A damaged newest does not count: the older intact one survives.
    (tmp_path / "step_5" / "a.pt").write_bytes(b"")
    prune(tmp_path, keep=1)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_5", "step_4"]

    # After a rewind `latest` names an older step; the newer ones are dropped first.
    save_checkpoint(tmp_path, 2, {"a": {"x": torch.zeros(8)}}, {})
    prune(tmp_path, keep=1)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_latest_is_preferred_over_higher_steps(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"a": {"x": step}}, {})
    disk.write_text_atomic(tmp_path / "latest", "step_2\n")
    assert latest_good_checkpoint(tmp_path) == tmp_path / "step_2"
    (tmp_path / "latest").unlink()
    assert latest_good_checkpoint(tmp_path) == tmp_path / "step_3"


def test_final_weights_with_tied_and_strided_tensors(tmp_path):
    embedding = torch.randn(10, 4)
    packed = torch.randn(6, 4)
    state = {
        "embed.weight": embedding,
        "head.weight": embedding,  # tied
        "q.weight": packed[:3],  # views of one buffer
        "k.weight": packed[3:],
        "proj.weight": torch.randn(4, 5).t(),  # non-contiguous
        "norm.weight": torch.randn(4).to(torch.bfloat16),
    }
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / ".tmp-model.safetensors-0badf00d").write_bytes(b"killed mid-write")
    path = write_final_weights(state, tmp_path / "final", {"step": "100"})
    write_final_weights(state, tmp_path / "final", {"step": "100"})  # replacing is atomic and allowed

    assert path == tmp_path / "final" / "model.safetensors"
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["model.safetensors"]
    loaded = load_file(path)
    assert sorted(loaded) == sorted(state)
    for name, tensor in state.items():
        assert bitwise_equal(loaded[name], tensor.contiguous())
    with safe_open(path, "pt") as file:
        assert file.metadata() == {"format": "pt", "step": "100"}
    assert state["head.weight"] is embedding  # the caller's tensors are untouched
