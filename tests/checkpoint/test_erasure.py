"""Erasure codes and their placement across nodes: every k, m in range, every pattern of up to m losses."""

import itertools
import os
import random

import pytest

from leantrain.checkpoint.erasure import make_codec
from leantrain.checkpoint.parity import (
    Group,
    decode_stripe,
    encode_stripe,
    fragment,
    group_of,
    join_fragments,
)
from leantrain.errors import UserError

K_RANGE = range(1, 5)
M_RANGE = range(1, 4)


@pytest.mark.parametrize("library", ["zfec", "pyeclib"])
@pytest.mark.parametrize("k", K_RANGE)
@pytest.mark.parametrize("m", M_RANGE)
def test_codec_round_trip_for_every_erasure_pattern(library, k, m):
    codec = make_codec(k, m, library)
    rng = random.Random(k * 10 + m)
    for length in (64, 4160):
        data = [rng.randbytes(length) for _ in range(k)]
        parity, meta = codec.encode(data)
        assert len(parity) == m and all(len(memoryview(p)) == length for p in parity)
        blocks = dict(enumerate([*data, *parity]))
        for lost in range(m + 1):
            for pattern in itertools.combinations(range(k + m), lost):
                survivors = {i: b for i, b in blocks.items() if i not in pattern}
                assert [bytes(b) for b in codec.decode(survivors, meta)] == data, pattern


def test_single_parity_is_the_bytewise_xor():
    rng = random.Random(0)
    for k, length in ((1, 64), (3, 64), (4, 13)):
        data = [rng.randbytes(length) for _ in range(k)]
        (parity,), _ = make_codec(k, 1).encode(data)
        expected = bytes(length)
        for block in data:
            expected = bytes(a ^ b for a, b in zip(expected, block))
        assert bytes(parity) == expected


def test_too_many_erasures_and_bad_settings_are_refused():
    codec = make_codec(3, 2, "zfec")
    data = [os.urandom(64) for _ in range(3)]
    parity, meta = codec.encode(data)
    with pytest.raises(ValueError, match="cannot rebuild"):
        codec.decode({0: data[0], 3: parity[0]}, meta)
    with pytest.raises(UserError, match="checkpoint.ec.library"):
        make_codec(2, 2, "raid")
    with pytest.raises(UserError, match="checkpoint.ec"):
        group_of(0, 3, 1, 1)


@pytest.mark.parametrize("k,m", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2), (2, 3)])
def test_each_node_holds_one_block_of_every_stripe(k, m):
    group = Group(nodes=tuple(range(10, 10 + k + m)), k=k, m=m)
    for stripe in range(group.n):
        kinds = [group.block_of(stripe, position) for position in range(group.n)]
        assert sorted(i for kind, i in kinds if kind == "data") == list(range(k))
        assert sorted(i for kind, i in kinds if kind == "parity") == list(range(m))
        for j, position in enumerate(group.parity_positions(stripe)):
            assert group.block_of(stripe, position) == ("parity", j)
        for index in range(k):
            assert group.block_of(stripe, group.data_position(stripe, index)) == ("data", index)
    for position in range(group.n):
        for index in range(k):
            assert group.block_of(group.stripe_of(position, index), position) == ("data", index)


@pytest.mark.parametrize("library", ["zfec", "pyeclib"])
@pytest.mark.parametrize("k,m", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2), (2, 3)])
def test_lost_nodes_are_rebuilt_bit_exact_from_the_survivors(library, k, m):
    """Simulate a group as the keepers run it: encode every stripe, lose up to m nodes, rebuild each."""
    group = Group(nodes=tuple(range(k + m)), k=k, m=m)
    codec = make_codec(k, m, library)
    rng = random.Random(k * 7 + m)
    blobs = [rng.randbytes(rng.randrange(1, 700)) for _ in group.nodes]  # nodes' snapshots differ in length
    held: dict[tuple[int, int], bytes] = {}  # (position, stripe) -> the block that position holds
    stripe_info = {}
    for stripe in range(group.n):
        data = [fragment(blobs[group.data_position(stripe, i)], k, i) for i in range(k)]
        parity, lengths, meta = encode_stripe(codec, data)
        stripe_info[stripe] = (lengths, meta)
        for i in range(k):
            held[(group.data_position(stripe, i), stripe)] = data[i]
        for j, block in enumerate(parity):
            held[(group.parity_positions(stripe)[j], stripe)] = bytes(block)
    for lost_count in range(1, m + 1):
        for lost in itertools.combinations(range(group.n), lost_count):
            for position in lost:
                pieces = []
                for index in range(k):
                    stripe = group.stripe_of(position, index)
                    blocks = {}
                    for other in range(group.n):
                        if other in lost:
                            continue
                        kind, i = group.block_of(stripe, other)
                        blocks[i if kind == "data" else k + i] = held[(other, stripe)]
                    lengths, meta = stripe_info[stripe]
                    pieces.append(decode_stripe(codec, blocks, lengths, meta)[index])
                assert join_fragments(pieces, len(blobs[position])) == blobs[position], (lost, position)
