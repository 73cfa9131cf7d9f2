"""RFC 6962 / RFC 9162 Merkle tree hashing, inclusion and consistency proofs, as pure functions.

No database here: a third party re-checks proofs with this module, `checkpoint.py` and a public key.
Hashing follows RFC 9162 §2.1: leaf = SHA-256(0x00 || data), node = SHA-256(0x01 || left || right),
the empty tree hashes to SHA-256(""). The ledger's leaf data is the 32-byte hash of an event (see
`chain.event_hash`), which already commits to the event's contents and its predecessor.

Stored trees address their perfect subtrees as (level, index): the node at level L, index i is the
root of leaves [i * 2^L, (i + 1) * 2^L); level 0 holds the leaf hashes themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fedpact.audit.events import LedgerError

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH of the empty tree (RFC 9162 §2.1.1)."""

_sha256 = hashlib.sha256


class ProofError(LedgerError):
    """A Merkle proof is malformed or does not verify; the message says which check failed."""


def leaf_hash(data: bytes) -> bytes:
    """Hash of one leaf: SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than `n` (n >= 2): where RFC 9162 splits a tree."""
    if n < 2:
        raise ValueError(f"a tree of {n} leaves has no split point")
    return 1 << ((n - 1).bit_length() - 1)


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes (already `leaf_hash`ed), computed level by level.

    Pairing left to right and promoting a lone last node gives the same left-balanced tree as the
    recursive definition of RFC 9162 §2.1.1.
    """
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        paired = [
            _sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def perfect_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """Split leaves [start, end) into aligned perfect subtrees, left to right, as (level, index).

    `start` must be a multiple of the largest such subtree, which holds for every range that
    appears in an RFC 9162 proof; the subtree hash of the range is the right fold of these nodes.
    """
    if not 0 <= start < end:
        raise ValueError(f"empty or negative leaf range [{start}, {end})")
    nodes: list[tuple[int, int]] = []
    position, remaining = start, end - start
    for level in range(remaining.bit_length() - 1, -1, -1):
        size = 1 << level
        if remaining & size:
            if position % size:
                raise ValueError(f"leaf range [{start}, {end}) is not aligned to its subtrees")
            nodes.append((level, position >> level))
            position += size
    return nodes


NodeSource = Callable[[Sequence[tuple[int, int]]], dict[tuple[int, int], bytes]]
"""Fetches stored perfect-subtree hashes by (level, index); returns a dict over the requested keys."""


def fold_right(hashes: Sequence[bytes]) -> bytes:
    """Combine left-to-right perfect subtree roots into the root of their left-balanced union."""
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = node_hash(left, result)
    return result


def _inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose hashes form PATH(index, D[size]), nearest sibling first (RFC 9162 §2.1.3.1)."""
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = split_point(hi - lo)
        if index - lo < k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
    ranges.reverse()
    return ranges


def _consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose hashes form PROOF(old_size, D[new_size]) (RFC 9162 §2.1.4.1)."""
    ranges: list[tuple[int, int]] = []

    def subproof(m: int, lo: int, hi: int, complete: bool) -> None:
        n = hi - lo
        if m == n:
            if not complete:
                ranges.append((lo, hi))
            return
        k = split_point(n)
        if m <= k:
            subproof(m, lo, lo + k, complete)
            ranges.append((lo + k, hi))
        else:
            subproof(m - k, lo + k, hi, False)
            ranges.append((lo, lo + k))

    subproof(old_size, 0, new_size, True)
    return ranges


def _hashes_for_ranges(ranges: Sequence[tuple[int, int]], nodes: NodeSource) -> list[bytes]:
    """Resolve each leaf range to its subtree hash with one batched fetch of stored nodes."""
    plans = [perfect_subtrees(lo, hi) for lo, hi in ranges]
    wanted = sorted({key for plan in plans for key in plan})
    found = nodes(wanted)
    missing = [key for key in wanted if key not in found]
    if missing:
        level, index = missing[0]
        raise ProofError(
            f"the stored Merkle tree lacks node (level {level}, index {index}); "
            "the tree was not integrated up to this size"
        )
    return [fold_right([found[key] for key in plan]) for plan in plans]


def inclusion_proof(index: int, size: int, nodes: NodeSource) -> list[bytes]:
    """Audit path proving leaf `index` is in the tree of `size` leaves, from stored subtree hashes."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    return _hashes_for_ranges(_inclusion_ranges(index, size), nodes)


def consistency_proof(old_size: int, new_size: int, nodes: NodeSource) -> list[bytes]:
    """Proof that the tree of `old_size` leaves is a prefix of the tree of `new_size` leaves."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"cannot prove tree size {old_size} consistent with {new_size}")
    if old_size in (0, new_size):
        return []
    return _hashes_for_ranges(_consistency_ranges(old_size, new_size), nodes)


def memory_nodes(leaves: Sequence[bytes]) -> NodeSource:
    """A NodeSource over an in-memory list of leaf hashes (for tests and exported logs)."""

    def fetch(keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        result = {}
        for level, index in keys:
            start, end = index << level, (index + 1) << level
            if end <= len(leaves):
                result[(level, index)] = root_hash(leaves[start:end])
        return result

    return fetch


def root_from_inclusion_proof(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes]
) -> bytes:
    """Recompute the tree root implied by an inclusion proof (RFC 9162 §2.1.3.2)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    fn, sn, result = index, size - 1, leaf
    for sibling in proof:
        if len(sibling) != 32:
            raise ProofError("inclusion proof holds a hash that is not 32 bytes")
        if sn == 0:
            raise ProofError(f"inclusion proof is too long for leaf {index} of {size}")
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"inclusion proof is too short for leaf {index} of {size}")
    return result


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless `proof` shows `leaf` at `index` in the tree of `size` with `root`."""
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError(
            f"inclusion proof for leaf {index} does not lead to the signed root of tree size {size}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ProofError unless `proof` shows tree `old_size` is a prefix of tree `new_size` (§2.1.4.2)."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"tree size went backwards: {old_size} then {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots were signed for tree size {old_size}")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError(f"empty consistency proof from size {old_size} to {new_size}")
    path = list(proof)
    if any(len(h) != 32 for h in path):
        raise ProofError("consistency proof holds a hash that is not 32 bytes")
    if old_size & (old_size - 1) == 0:  # exact power of two: the old root is itself a node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"consistency proof from {old_size} to {new_size} is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"consistency proof from {old_size} to {new_size} is too short")
    if fr != old_root:
        raise ProofError(f"consistency proof does not reproduce the old root of size {old_size}")
    if sr != new_root:
        raise ProofError(f"consistency proof does not reproduce the new root of size {new_size}")


@dataclass
class MerkleFrontier:
    """The right edge of a growing tree (its perfect subtree roots); appends in O(1) amortised.

    `on_node(level, index, hash)`, if given, receives every perfect subtree completed by an append,
    leaves included, so a store can persist exactly what proofs will need.
    """

    size: int = 0
    stack: list[bytes] = field(default_factory=list)
    on_node: Callable[[int, int, bytes], None] | None = None

    @classmethod
    def at(cls, size: int, nodes: NodeSource, on_node=None) -> MerkleFrontier:
        """Rebuild the frontier of a stored tree of `size` leaves from its perfect subtree roots."""
        keys = perfect_subtrees(0, size) if size else []
        found = nodes(keys)
        missing = [key for key in keys if key not in found]
        if missing:
            raise ProofError(f"the stored Merkle tree lacks node {missing[0]} of tree size {size}")
        return cls(size, [found[key] for key in keys], on_node)

    def append(self, leaf: bytes) -> None:
        index, level, current = self.size, 0, leaf
        if self.on_node is not None:
            self.on_node(0, index, leaf)
        stack = self.stack
        while index & 1:
            current = _sha256(b"\x01" + stack.pop() + current).digest()
            index >>= 1
            level += 1
            if self.on_node is not None:
                self.on_node(level, index, current)
        stack.append(current)
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def extend_level_by_level(
        self, leaves: Sequence[bytes], *, collect: bool = False
    ) -> list[tuple[int, int, bytes]]:
        """Append many leaves at once, hashing level by level (no per-leaf Python calls).

        Same result as `append` for each leaf. With `collect`, returns every perfect subtree the
        leaves complete as (level, index, hash), leaves included; `on_node` is not called.
        """
        if not leaves:
            return []
        size = self.size
        levels = [lv for lv in range(size.bit_length() - 1, -1, -1) if size >> lv & 1]
        open_nodes = dict(zip(levels, self.stack, strict=True))
        completed: list[tuple[int, int, bytes]] = []
        nodes = list(leaves)
        start, level = size, 0
        sha256 = _sha256
        while nodes:
            if collect:
                completed.extend(
                    zip([level] * len(nodes), range(start, start + len(nodes)), nodes, strict=True)
                )
            if start & 1:  # the first new node is a right child: its left sibling waited here
                nodes.insert(0, open_nodes.pop(level))
                start -= 1
            if len(nodes) & 1:
                open_nodes[level] = nodes[-1]
            pairs = iter(nodes[: len(nodes) & ~1])
            nodes = [sha256(b"\x01" + left + right).digest() for left, right in zip(pairs, pairs, strict=False)]
            start >>= 1
            level += 1
        self.size = size + len(leaves)
        self.stack = [open_nodes[lv] for lv in sorted(open_nodes, reverse=True)]
        return completed

    def root(self) -> bytes:
        return fold_right(self.stack) if self.stack else EMPTY_ROOT
