"""RFC 9162 section 2.1 Merkle trees: hashing, proofs, and their verification.

The log commits to its events by the root of a Merkle tree over them. An inclusion proof shows
that one leaf is in the tree of a given root; a consistency proof shows that the tree of one
root is a prefix of the tree of another, i.e. that the log only appended. Leaves and interior
nodes are hashed with different one-byte prefixes so that a node can never pass for a leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(Exception):
    """A proof, or something it relies on, does not check out."""


def leaf_hash(data: bytes) -> bytes:
    """Hash a leaf: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash an interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): where RFC 9162 splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only Merkle tree over leaf hashes that answers proofs for any earlier size.

    It keeps the hash of every complete subtree (a perfect subtree whose leaves are all present):
    about one hash per leaf, computed once. Any other subtree is the right edge of some tree
    size and is combined from at most log2(n) complete ones, so a root or a proof costs
    O(log n) hashing, however many proofs are asked for.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        leaves = list(leaf_hashes)
        for h in leaves:
            _check_hash(h, "leaf hash")
        # _levels[k][i] is the hash of the complete subtree of leaves [i * 2**k, (i+1) * 2**k).
        self._levels: list[list[bytes]] = [leaves]
        level = leaves
        sha256 = hashlib.sha256
        while len(level) > 1:
            level = [
                sha256(b"\x01" + level[i] + level[i + 1]).digest()
                for i in range(0, len(level) - 1, 2)
            ]
            self._levels.append(level)

    def __len__(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        """Add a leaf hash; completes at most one subtree per level."""
        _check_hash(leaf, "leaf hash")
        self._levels[0].append(leaf)
        k = 0
        while len(self._levels[k]) % 2 == 0:
            left, right = self._levels[k][-2:]
            if k + 1 == len(self._levels):
                self._levels.append([])
            self._levels[k + 1].append(node_hash(left, right))
            k += 1

    def root(self, size: int | None = None) -> bytes:
        """The root hash of the tree of the first ``size`` leaves (default: all)."""
        size = self._size(size)
        if size == 0:
            return EMPTY_ROOT
        return self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The RFC 9162 inclusion proof (PATH) of leaf ``index`` in the tree of ``size`` leaves."""
        size = self._size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is not in a tree of {size} leaves")
        path = []
        start, end, m = 0, size, index
        while end - start > 1:
            k = _split(end - start)
            if m < k:
                path.append(self._subtree(start + k, end))
                end = start + k
            else:
                path.append(self._subtree(start, start + k))
                start, m = start + k, m - k
        path.reverse()  # PATH lists the sibling nearest the leaf first
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The RFC 9162 consistency proof from ``old_size`` to ``new_size`` leaves.

        Empty when the sizes are equal or ``old_size`` is 0: there is nothing to prove then.
        """
        new_size = self._size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
        if old_size in (0, new_size):
            return []
        proof = []
        start, end, m, whole = 0, new_size, old_size, True
        # SUBPROOF(m, D[start:end], whole), unrolled: each step descends one side.
        while m != end - start:
            k = _split(end - start)
            if m <= k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start, m, whole = start + k, m - k, False
        if not whole:
            proof.append(self._subtree(start, end))
        proof.reverse()
        return proof

    def _size(self, size: int | None) -> int:
        if size is None:
            return len(self)
        if not 0 <= size <= len(self):
            raise ValueError(f"tree size {size} is not between 0 and {len(self)}")
        return size

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a subtree that starts on a boundary of its own size's split."""
        n = end - start
        k = n.bit_length() - 1
        if n == 1 << k and start % n == 0:
            return self._levels[k][start >> k]
        k = _split(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))


def verify_inclusion(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves and ``root``.

    RFC 9162 section 2.1.3.2, step by step. Raises ProofError.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of {size} leaves")
    _check_proof_hashes([leaf_hash, *proof])
    fn, sn = index, size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``old_size`` leaves and ``old_root`` is a prefix of the new one.

    RFC 9162 section 2.1.4.2, with equal sizes meaning equal roots and an empty proof. A proof
    from the empty tree proves nothing and is refused, as transparency-dev/merkle does; a caller
    that holds no earlier tree (a witness seeing a log for the first time) has nothing to check.
    Raises ProofError.
    """
    if not 0 <= old_size <= new_size:
        raise ProofError(f"no consistency from size {old_size} to size {new_size}")
    if old_size == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing")
    _check_proof_hashes(proof)
    if old_size == new_size:
        if proof:
            raise ProofError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("same tree size, different roots")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old tree is a node of the new one
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")


def _check_hash(h: bytes, what: str) -> None:
    if not isinstance(h, bytes) or len(h) != HASH_SIZE:
        raise ValueError(f"a {what} must be {HASH_SIZE} bytes")


def _check_proof_hashes(hashes: Sequence[bytes]) -> None:
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise ProofError(f"a hash in a proof must be {HASH_SIZE} bytes")
