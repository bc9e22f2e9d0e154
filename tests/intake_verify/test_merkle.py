"""RFC 9162 Merkle trees: published vectors, a big tree's proofs, and that tampering fails them."""

from __future__ import annotations

import base64
import hashlib
import random
import time

import pytest

from intake_verify.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    ProofError,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# The classic 8-leaf tree of RFC 6962/9162 test suites: leaf inputs and the root of every
# prefix, from transparency-dev/merkle testonly/constants.go (LeafInputs, RootHashes), the same
# data as google/certificate-transparency's merkle_tree_test.cc.
LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
              "606162636465666768696a6b6c6d6e6f")
]  # fmt: skip
ROOTS = [
    bytes.fromhex(h)
    for h in (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]
# Level 1 and level 2 node hashes of the same tree (testonly/constants.go NodeHashes).
LEVEL1 = [
    bytes.fromhex(h)
    for h in (
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    )
]


def b64(text: str) -> bytes:
    return base64.b64decode(text)


# Happy-path probes from transparency-dev/merkle testdata/inclusion/{1,2,3,4}/happy-path.json:
# (leaf index, tree size, leaf hash, proof, root), over the tree above.
INCLUSION_VECTORS = [
    (0, 8, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
      "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="],
     "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg="),
    (5, 8, "QnGia+DYqE8L1UyMMC58s6O10fpngKQLzOKHNHfatlg=",
     ["vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms=",
      "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="],
     "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg="),
    (2, 3, "ApjRIpBtz8EIkstTpzmS/FufST6kybrbJ7eRtBJ6f+c=",
     ["+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU="],
     "rra8/idLcKFPsGel5VeCZNsPqbUa9eC6FZFY8yngbnc="),
    (1, 5, "lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
     ["bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
      "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms="],
     "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ="),
]  # fmt: skip

# From transparency-dev/merkle testdata/consistency/{1,2,3,4}/happy-path.json:
# (old size, new size, old root, new root, proof).
CONSISTENCY_VECTORS = [
    (1, 8, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
      "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="]),
    (6, 8, "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=",
     "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
      "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
    (2, 5, "+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU=",
     "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=",
     ["Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms="]),
    (6, 7, "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=",
     "3bib5AOAnjJXUNPSY814kpwpQreUKjS3fhIslZSnTIw=",
     ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
      "sIaT7C5yFZcTBkHoIR5+7cy0wmQTlj7ubB4u0W/7Gl8=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
]  # fmt: skip

# Edge cases from transparency-dev/merkle testdata/consistency/additional/*.json that must fail:
# (old size, new size, old root, new root, proof). "ZG9uJ3QgY2FyZSAx" is "don't care 1".
E = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="  # base64 of the empty tree's root
CONSISTENCY_FAILURES = [
    (0, 1, E, E, [E]),  # from the empty tree: meaningless
    (0, 0, "ZG9uJ3QgY2FyZSAx", "ZG9uJ3QgY2FyZSAx", []),
    (1, 1, E, "ZG9uJ3QgY2FyZSAy", []),  # same size, different roots
    (2, 1, "ZG9uJ3QgY2FyZSAx", "ZG9uJ3QgY2FyZSAy", []),  # shrinking
    (1, 2, "ZG9uJ3QgY2FyZSAx", "ZG9uJ3QgY2FyZSAy", []),  # growing without a proof
    (1, 1, E, E, [E]),  # equal sizes with a proof
]


def test_hashing_matches_the_published_tree() -> None:
    tree = MerkleTree(leaf_hash(data) for data in LEAVES)
    assert EMPTY_ROOT == ROOTS[0] == hashlib.sha256(b"").digest()
    assert [tree.root(n) for n in range(9)] == ROOTS
    assert [node_hash(leaf_hash(LEAVES[i]), leaf_hash(LEAVES[i + 1])) for i in (0, 2, 4, 6)] == (
        LEVEL1
    )


def test_appending_gives_the_same_roots_as_building_at_once() -> None:
    tree = MerkleTree()
    for n, data in enumerate(LEAVES, start=1):
        tree.append(leaf_hash(data))
        assert len(tree) == n
        assert tree.root() == ROOTS[n]


@pytest.mark.parametrize(("index", "size", "leaf", "proof", "root"), INCLUSION_VECTORS)
def test_published_inclusion_proofs(
    index: int, size: int, leaf: str, proof: list[str], root: str
) -> None:
    tree = MerkleTree(leaf_hash(data) for data in LEAVES)
    assert tree.inclusion_proof(index, size) == [b64(p) for p in proof]
    assert tree.root(size) == b64(root)
    verify_inclusion(index, size, b64(leaf), [b64(p) for p in proof], b64(root))
    with pytest.raises(ProofError):
        verify_inclusion(index, size, b64(leaf), [b64(p) for p in proof][:-1], b64(root))
    with pytest.raises(ProofError):
        verify_inclusion(index, size, b64(leaf), [b64(p) for p in proof] + [b64(root)], b64(root))


@pytest.mark.parametrize(("old", "new", "old_root", "new_root", "proof"), CONSISTENCY_VECTORS)
def test_published_consistency_proofs(
    old: int, new: int, old_root: str, new_root: str, proof: list[str]
) -> None:
    tree = MerkleTree(leaf_hash(data) for data in LEAVES)
    assert tree.consistency_proof(old, new) == [b64(p) for p in proof]
    verify_consistency(old, new, b64(old_root), b64(new_root), [b64(p) for p in proof])
    with pytest.raises(ProofError):
        verify_consistency(old, new, b64(new_root), b64(old_root), [b64(p) for p in proof])


@pytest.mark.parametrize(("old", "new", "old_root", "new_root", "proof"), CONSISTENCY_FAILURES)
def test_published_consistency_edge_cases_fail(
    old: int, new: int, old_root: str, new_root: str, proof: list[str]
) -> None:
    with pytest.raises(ProofError):
        verify_consistency(old, new, b64(old_root), b64(new_root), [b64(p) for p in proof])


def test_single_leaf_tree_and_a_leaf_hash_that_is_not_a_hash() -> None:
    # transparency-dev/merkle testdata/inclusion/single-entry: root == leaf, empty proof.
    leaf = b64("DTrtAjFI/9KiWfvQzcf7PPl1ZYdg03dbgq9vkKrMLfw=")
    verify_inclusion(0, 1, leaf, [], leaf)
    with pytest.raises(ProofError):
        verify_inclusion(0, 1, b"", [], b"")
    with pytest.raises(ProofError):
        verify_inclusion(0, 0, leaf, [], EMPTY_ROOT)


# A tree of more than 100,000 leaves, built once for the module.
BIG = 100_003


@pytest.fixture(scope="module")
def big_tree() -> MerkleTree:
    return MerkleTree(leaf_hash(i.to_bytes(8, "big")) for i in range(BIG))


def flipped(data: bytes, bit: int) -> bytes:
    """``data`` with one bit inverted."""
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_inclusion_proofs_in_a_big_tree_verify_and_any_flipped_bit_fails(
    big_tree: MerkleTree,
) -> None:
    rng = random.Random(12)
    root = big_tree.root()
    indexes = [0, BIG - 1, *rng.sample(range(BIG), 4)]
    for index in indexes:
        leaf = leaf_hash(index.to_bytes(8, "big"))
        proof = big_tree.inclusion_proof(index)
        verify_inclusion(index, BIG, leaf, proof, root)
        for bit in range(256):
            with pytest.raises(ProofError):
                verify_inclusion(index, BIG, flipped(leaf, bit), proof, root)
            with pytest.raises(ProofError):
                verify_inclusion(index, BIG, leaf, proof, flipped(root, bit))
            for i in range(len(proof)):
                tampered = [*proof[:i], flipped(proof[i], bit), *proof[i + 1 :]]
                with pytest.raises(ProofError):
                    verify_inclusion(index, BIG, leaf, tampered, root)
        for other_index in (index ^ 1, index + 1, index - 1, index ^ (1 << 15)):
            if 0 <= other_index < BIG:
                with pytest.raises(ProofError):
                    verify_inclusion(other_index, BIG, leaf, proof, root)
        for other_size in (BIG + 1, BIG - 1, BIG * 2, BIG // 2, index + 1):
            if other_size != BIG and changes_shape(big_tree, index, BIG, other_size):
                with pytest.raises(ProofError):
                    verify_inclusion(index, other_size, leaf, proof, root)


def changes_shape(tree: MerkleTree, index: int, size: int, other_size: int) -> bool:
    """Whether the path from leaf ``index`` to the root turns differently at ``other_size``.

    RFC 9162 verification reads the tree size only through the turns of the path (is the
    sibling on the left or the right, how many levels it skips): two sizes whose paths turn
    alike verify the same proof against the same root. That is harmless because the size comes
    from the signed checkpoint, whose every bit the proof-file tests cover; here only the size
    changes that change the path must fail.
    """

    def turns(n: int) -> list[tuple[bool, int]]:
        fn, sn, out = index, n - 1, []
        while sn:
            left, skipped = bool(fn & 1 or fn == sn), 0
            while left and fn and not fn & 1:
                fn, sn, skipped = fn >> 1, sn >> 1, skipped + 1
            out.append((left, skipped))
            fn, sn = fn >> 1, sn >> 1
        return out

    return turns(size) != turns(other_size)


def test_inclusion_proofs_at_many_random_indexes_and_sizes(big_tree: MerkleTree) -> None:
    rng = random.Random(1212)
    for _ in range(300):
        size = rng.randrange(1, BIG + 1)
        index = rng.randrange(size)
        leaf = leaf_hash(index.to_bytes(8, "big"))
        verify_inclusion(
            index, size, leaf, big_tree.inclusion_proof(index, size), big_tree.root(size)
        )


def test_consistency_proofs_between_random_sizes_verify_and_tampering_fails(
    big_tree: MerkleTree,
) -> None:
    rng = random.Random(9162)
    pairs = [(1, BIG), (BIG - 1, BIG), (65536, BIG), (65536, 65537)]
    for _ in range(200):
        low, high = sorted(rng.sample(range(1, BIG + 1), 2))
        pairs.append((low, high))
    for n, (old, new) in enumerate(pairs):
        old_root, new_root = big_tree.root(old), big_tree.root(new)
        proof = big_tree.consistency_proof(old, new)
        verify_consistency(old, new, old_root, new_root, proof)
        # Every bit of everything for a few pairs, one random bit of each part for the others.
        bits = range(256) if n < 6 else [rng.randrange(256)]
        for bit in bits:
            with pytest.raises(ProofError):
                verify_consistency(old, new, flipped(old_root, bit), new_root, proof)
            with pytest.raises(ProofError):
                verify_consistency(old, new, old_root, flipped(new_root, bit), proof)
            for i in range(len(proof)):
                tampered = [*proof[:i], flipped(proof[i], bit), *proof[i + 1 :]]
                with pytest.raises(ProofError):
                    verify_consistency(old, new, old_root, new_root, tampered)
        for other_old, other_new in [
            (old + 1, new),
            (old - 1, new),
            (old, new * 2),
            (old // 2, new),
        ]:
            if 0 < other_old <= other_new:
                with pytest.raises(ProofError):
                    verify_consistency(other_old, other_new, old_root, new_root, proof)
        with pytest.raises(ProofError):
            verify_consistency(old, new, old_root, new_root, proof[:-1])
        with pytest.raises(ProofError):
            verify_consistency(old, new, old_root, new_root, [*proof, proof[-1]])


def test_a_different_history_fails_consistency(big_tree: MerkleTree) -> None:
    """A log that rewrote one old leaf cannot prove its new tree extends the old one."""
    old = 1000
    forked = MerkleTree(leaf_hash(i.to_bytes(8, "big")) for i in range(2000))
    forked_leaves = [leaf_hash(i.to_bytes(8, "big")) for i in range(2000)]
    forked_leaves[517] = leaf_hash(b"rewritten")
    forked = MerkleTree(forked_leaves)
    with pytest.raises(ProofError):
        verify_consistency(
            old, 2000, big_tree.root(old), forked.root(), forked.consistency_proof(old, 2000)
        )


def test_proofs_after_the_first_cost_little(big_tree: MerkleTree) -> None:
    """The tree keeps its subtree hashes: a thousand proofs take a blink, not a rebuild each."""
    start = time.perf_counter()
    for index in range(0, BIG, BIG // 1000):
        big_tree.inclusion_proof(index)
        big_tree.consistency_proof(index + 1)
    assert time.perf_counter() - start < 1.0


def test_requests_outside_the_tree_are_refused() -> None:
    tree = MerkleTree(leaf_hash(data) for data in LEAVES)
    with pytest.raises(ValueError, match="not in a tree"):
        tree.inclusion_proof(8)
    with pytest.raises(ValueError, match="tree size"):
        tree.root(9)
    with pytest.raises(ValueError, match="no consistency proof"):
        tree.consistency_proof(5, 4)
    with pytest.raises(ValueError, match="32 bytes"):
        tree.append(b"short")
    assert tree.consistency_proof(0, 8) == tree.consistency_proof(8, 8) == []
