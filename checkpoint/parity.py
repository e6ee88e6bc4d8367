"""Where the erasure-coded pieces of a group of nodes' snapshots live, and how a lost node is rebuilt.

Nodes form groups of n = k + m consecutive node ranks. Each node's snapshot (its "blob": the
snapshots of its local ranks, back to back) is cut into k fragments. The group's fragments form n
stripes with rotating parity, as in RAID 6: stripe s has its m parity blocks on group positions
s, s+1, ..., s+m-1 (mod n) and its k data blocks on the other positions, each block being one
fragment of that node's blob. Every node therefore holds exactly one block of every stripe (one of
its own fragments, or a parity block of the others'), its own blob stays whole in its own memory,
and losing any m nodes of a group loses at most m blocks of any stripe: each lost fragment is
decoded from k surviving blocks. Parity costs m/k of a blob per node; with n = 2, k = m = 1 each
node simply holds a copy of the other's snapshot. The parity of stripe s is computed on position s
(the stripe's "gatherer") from the k data blocks, which may differ in length: they are zero-padded
to the longest and their true lengths kept with the parity.
"""

from dataclasses import dataclass

from ..errors import UserError
from .erasure import Block, Codec

FRAGMENT_ALIGN = 64


@dataclass(frozen=True)
class Group:
    """The erasure-coding group of one node: member node ranks in position order, and k, m."""

    nodes: tuple[int, ...]
    k: int
    m: int

    @property
    def n(self) -> int:
        return self.k + self.m

    def position(self, node: int) -> int:
        return self.nodes.index(node)

    def parity_positions(self, stripe: int) -> list[int]:
        """Positions holding parity blocks 0..m-1 of ``stripe``; block 0's holder computes them."""
        return [(stripe + j) % self.n for j in range(self.m)]

    def data_position(self, stripe: int, index: int) -> int:
        """Position whose fragment is data block ``index`` (0..k-1) of ``stripe``."""
        return (stripe + self.m + index) % self.n

    def stripe_of(self, position: int, fragment: int) -> int:
        """The stripe in which fragment ``fragment`` of the node at ``position`` is data block ``fragment``."""
        return (position - self.m - fragment) % self.n

    def block_of(self, stripe: int, position: int) -> tuple[str, int]:
        """What ``position`` holds of ``stripe``: ("data", index) or ("parity", index)."""
        offset = (position - stripe) % self.n
        return ("parity", offset) if offset < self.m else ("data", offset - self.m)


def group_of(node: int, nnodes: int, k: int, m: int) -> Group:
    """The group of ``node`` among ``nnodes`` nodes; UserError unless groups of k + m tile the nodes."""
    n = k + m
    if nnodes % n:
        raise UserError(
            f"checkpoint.ec: k={k} + m={m} = {n} nodes per group does not divide the {nnodes} nodes of this run; "
            "choose k and m so that k + m divides the number of nodes, or set k=0 to disable erasure coding"
        )
    first = node - node % n
    return Group(nodes=tuple(range(first, first + n)), k=k, m=m)


def fragment_length(blob_length: int, k: int) -> int:
    """Length of each of the k fragments of a blob: ceil(blob / k), rounded up to 64 bytes."""
    length = -(-blob_length // k)
    return max(FRAGMENT_ALIGN, -(-length // FRAGMENT_ALIGN) * FRAGMENT_ALIGN)


def fragment(blob: Block, k: int, index: int) -> bytes:
    """Fragment ``index`` of ``blob``: its bytes [index*F, (index+1)*F), zero-padded to F."""
    view = memoryview(blob).cast("B")
    length = fragment_length(len(view), k)
    piece = bytes(view[index * length : (index + 1) * length])
    return piece + bytes(length - len(piece))


def join_fragments(fragments: list[Block], blob_length: int) -> bytes:
    """Inverse of ``fragment``: the blob from its k fragments in order."""
    return b"".join(bytes(memoryview(piece).cast("B")) for piece in fragments)[:blob_length]


def encode_stripe(codec: Codec, data: list[Block]) -> tuple[list[Block], list[int], bytes]:
    """Parity of one stripe from its k data blocks in index order; returns (parity, data lengths, meta)."""
    lengths = [len(memoryview(block)) for block in data]
    width = max(lengths)
    padded = [_pad(block, width) for block in data]
    parity, meta = codec.encode(padded)
    return parity, lengths, meta


def decode_stripe(codec: Codec, blocks: dict[int, Block], lengths: list[int], meta: bytes) -> list[bytes]:
    """The stripe's k data blocks (true lengths) from any k blocks: index < k data, k.. parity."""
    width = max(lengths)
    padded = {index: _pad(block, width) if index < codec.k else block for index, block in blocks.items()}
    data = codec.decode(padded, meta)
    return [bytes(memoryview(block).cast("B")[:length]) for block, length in zip(data, lengths, strict=True)]


def _pad(block: Block, width: int) -> Block:
    view = memoryview(block).cast("B")
    return block if len(view) == width else bytes(view) + bytes(width - len(view))
