"""The byte layout of in-memory snapshots: exact round trips, sharding across local ranks, damage."""

import json
import random
from collections import OrderedDict

import pytest
import torch

from leantrain.checkpoint.snapshot import (
    SnapshotError,
    assemble,
    digest,
    flatten,
    plan_snapshot,
    read_header,
    shard_of,
    unflatten,
)


def states(seed: int) -> tuple[dict, dict]:
    """A model, an AdamW state after two steps, a schedule and per-rank RNG and data state."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 5, dtype=torch.bfloat16)).float().square().mean().backward()
        optimizer.step()
    replicated = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "progress": {"step": 2, "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}}
    rng = random.Random(seed)
    per_rank = {"rng": {"torch": torch.get_rng_state(), "python": rng.getstate()}, "data": {"cursor": 12}}
    return replicated, per_rank


def write(step: int, groups: dict, rank: int, local_rank: int, local_world_size: int) -> bytearray:
    """Lay out and copy a snapshot as a rank would (all copies done at once here)."""
    flat = {group: flatten(states, group) for group, states in groups.items()}
    owners = shard_of(flat["replicated"][1], local_world_size)
    held = {"replicated": [owner == local_rank for owner in owners], "per_rank": [True] * len(flat["per_rank"][1])}
    identity = {"rank": rank, "world_size": local_world_size, "node": 0, "local_rank": local_rank}
    plan = plan_snapshot(step, identity, flat, held)
    buffer = bytearray(plan.nbytes + 100)  # slots are larger than the snapshots they hold
    view = torch.frombuffer(buffer, dtype=torch.uint8)
    view[: len(plan.prefix)] = torch.frombuffer(bytearray(plan.prefix), dtype=torch.uint8)
    for source, offset in plan.copies:
        view[offset : offset + source.nbytes].view(source.dtype).view(source.shape).copy_(source)
    return buffer[: plan.nbytes]


def assert_same(got, want) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same(a, b)
    else:
        assert got == want


def test_flatten_unflatten_round_trip_keeps_types_and_order():
    tree = OrderedDict(b=[1, (torch.ones(2), "x")], a={"t": torch.arange(3), "n": None, 7: float("inf")},
                       c={"dtype": torch.bfloat16, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
                          "z": 1 + 2j, "nested": [[], (), {}], "f": 0.1 + 0.2, "big": 2**70, "neg0": -0.0})
    skeleton, tensors = flatten(tree)
    assert [t.tolist() for t in tensors] == [[1.0, 1.0], [0, 1, 2]]
    through_json = json.loads(json.dumps(skeleton))
    assert_same(unflatten(through_json, tensors), tree)
    assert str(unflatten(through_json, tensors)["c"]["neg0"]) == "-0.0"


@pytest.mark.parametrize("local_world_size", [1, 2, 3])
def test_node_snapshots_rebuild_every_rank_state_exactly(local_world_size):
    replicated, _ = states(0)
    per_ranks = [states(10 + r)[1] for r in range(local_world_size)]
    buffers = [(write(7, {"replicated": replicated, "per_rank": per_ranks[r]}, r, r, local_world_size), f"rank {r}")
               for r in range(local_world_size)]
    step, got_replicated, got_per_rank = assemble(buffers)
    assert step == 7
    assert_same(got_replicated, replicated)
    assert sorted(got_per_rank) == list(range(local_world_size))
    for rank in range(local_world_size):
        assert_same(got_per_rank[rank], per_ranks[rank])
    # Sharded: the node holds the replicated bytes once, not once per rank.
    _, shared = flatten(replicated)
    held = sum(len(read_header(data, where)[0]["table"]["replicated"]) for data, where in buffers)
    assert held == len(shared)


def test_restored_tensors_do_not_alias_the_slot():
    replicated, per_rank = states(1)
    buffer = write(3, {"replicated": replicated, "per_rank": per_rank}, 0, 0, 1)
    _, got, _ = assemble([(buffer, "slot")])
    before = got["model"]["0.weight"].clone()
    buffer[:] = bytes(len(buffer))
    assert torch.equal(got["model"]["0.weight"], before)


def test_views_of_one_tensor_are_stored_once():
    weight = torch.randn(64, 16)
    tied = {"embed": weight, "head": weight}
    lone = write(1, {"replicated": {"m": tied}, "per_rank": {}}, 0, 0, 1)
    single = write(1, {"replicated": {"m": {"embed": weight}}, "per_rank": {}}, 0, 0, 1)
    assert len(lone) - len(single) < weight.nbytes
    _, got, _ = assemble([(lone, "slot")])
    assert torch.equal(got["m"]["head"], weight) and torch.equal(got["m"]["embed"], weight)


def test_damage_is_detected_and_named():
    replicated, per_rank = states(2)
    buffer = write(4, {"replicated": replicated, "per_rank": per_rank}, 0, 0, 1)
    with pytest.raises(SnapshotError, match="slot 3: truncated"):
        assemble([(buffer[: len(buffer) - 64], "slot 3")])
    damaged = bytearray(buffer)
    damaged[2] ^= 0xFF
    with pytest.raises(SnapshotError, match="slot 3: not a snapshot"):
        assemble([(damaged, "slot 3")])
    flipped = bytearray(buffer)
    flipped[-5] ^= 0x10  # in the tensor bytes: only the checksum notices
    assert digest(flipped) != digest(buffer)
    with pytest.raises(SnapshotError, match="held by no snapshot"):
        assemble([(write(4, {"replicated": replicated, "per_rank": per_rank}, 0, 0, 2), "half")])


def test_unsafe_values_are_refused_at_snapshot_time():
    class Custom:
        pass

    with pytest.raises(TypeError, match=r"per_rank.x\[1\] is a Custom"):
        flatten({"x": [1, Custom()]}, "per_rank")
    with pytest.raises(TypeError, match="key"):
        flatten({(1, 2): 3})


def test_shard_of_balances_bytes_deterministically():
    tensors = [torch.empty(n) for n in (100, 1, 50, 50, 3, 98)]
    owners = shard_of(tensors, 2)
    assert owners == shard_of(list(tensors), 2)
    loads = [sum(t.numel() for t, o in zip(tensors, owners) if o == part) for part in range(2)]
    assert abs(loads[0] - loads[1]) <= 2
