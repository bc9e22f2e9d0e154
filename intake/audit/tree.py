"""The Merkle tree over the audit chain: leaves from stored events, roots, a process cache.

Why: a signed chain head proves the whole trail to someone who can read the whole trail. A
Merkle tree head (RFC 9162 hashing, intake_verify.merkle) proves one event to someone who holds
only that event, a few dozen hashes and the public key: an outside auditor, or a patient asking
who opened their request. Leaf i is the event at seq i + 1; its data is the event's public
fields plus its chain hash (intake_verify.leaf), so the tree commits to everything the chain
does while a proof discloses no actor, detail or client pseudonym.

The leaves are read from the database, which an attacker may have changed: whatever is built
here is trusted only once its root equals a signed one (intake.audit.checkpoints, proofs).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string

from sqlalchemy import Engine, select

from intake.audit.chain import Row, _stored_rows
from intake.extensions import DbSession
from intake.models import AuditEvent
from intake_verify import leaf, merkle


def team_of(details: str) -> str | None:
    """The request's team an event recorded in its details, if it did (else None)."""
    if '"team"' not in details:  # most events: skip parsing them
        return None
    try:
        recorded = json.loads(details)
    except ValueError:
        return None
    team = recorded.get("team") if isinstance(recorded, dict) else None
    return team if isinstance(team, str) else None


def row_record(row: Row) -> dict[str, object]:
    """The public leaf record of one stored row (as read by chain._stored_rows)."""
    seq, at, _actor, role, action, ref, outcome, details, _ip, _prev, chain_hash = row
    return leaf.leaf_record(seq, at, action, ref, outcome, role, team_of(details), chain_hash)


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else _json_string(value)


def row_leaf_hash(row: Row) -> bytes:
    """The leaf hash of one stored row: ``leaf_hash(leaf_data(row_record(row)))``, fast.

    Built by hand, byte for byte what intake_verify.leaf writes (a test holds them equal),
    because verification hashes every event of the chain this way.
    """
    seq, at, _actor, role, action, ref, outcome, details, _ip, _prev, chain_hash = row
    text = (
        f'{{"action":{_json_string(action)},"actor_role":{_json_or_null(role)},'
        f'"chain_hash":{_json_string(chain_hash)},"created_at":{_json_string(at)},'
        f'"outcome":{_json_string(outcome)},"reference":{_json_or_null(ref)},"seq":{seq},'
        f'"team":{_json_or_null(team_of(details))}}}'
    )
    return hashlib.sha256(b"\x00" + LEAF_PREFIX + text.encode()).digest()


LEAF_PREFIX = leaf.LEAF_PREFIX


def leaf_hashes(rows: Iterable[Row], up_to: int) -> Iterator[bytes]:
    """Leaf hashes of ``rows`` (in seq order) through seq ``up_to``; a gap stops them."""
    expected = None
    for row in rows:
        seq = row[0]
        if seq > up_to or (expected is not None and seq != expected):
            return
        expected = seq + 1
        yield row_leaf_hash(row)


class CompactRange:
    """The roots of the perfect subtrees that make up a tree of ``size`` leaves, left first.

    Enough to compute the tree's root, and to extend it by more leaves, without the leaves
    themselves: log2(size) hashes. The signer keeps one beside each checkpoint so that the
    next one hashes only the new events.
    """

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        self.size = size
        self.hashes = list(hashes)
        if len(self.hashes) != bin(size).count("1"):
            raise ValueError("a compact range holds one hash per 1 bit of its size")

    def append(self, leaf_hash: bytes) -> None:
        node, size = leaf_hash, self.size
        while size & 1:  # merge with each complete left subtree of the same height
            node = merkle.node_hash(self.hashes.pop(), node)
            size >>= 1
        self.hashes.append(node)
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return merkle.EMPTY_ROOT
        node = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            node = merkle.node_hash(left, node)
        return node

    def to_hex(self) -> list[str]:
        return [h.hex() for h in self.hashes]


def extend_range(session: DbSession, start: CompactRange, up_to: int) -> CompactRange:
    """``start`` extended with the stored events after it through seq ``up_to``."""
    grown = CompactRange(start.size, start.hashes)
    rows = _stored_rows(session, start.size)
    try:
        for leaf_hash in leaf_hashes(rows, up_to):
            grown.append(leaf_hash)
    finally:
        rows.close()
    return grown


def roots_at(session: DbSession, sizes: Iterable[int]) -> dict[int, bytes]:
    """The tree's root at each of ``sizes``, in one pass over the stored chain.

    A size beyond the stored events (or past a gap in seq) gets no root.
    """
    wanted = sorted(set(s for s in sizes if s > 0))
    found: dict[int, bytes] = {}
    if not wanted:
        return found
    compact = CompactRange()
    rows = _stored_rows(session, 0)
    try:
        pending = iter(wanted)
        target = next(pending)
        for leaf_hash in leaf_hashes(rows, wanted[-1]):
            compact.append(leaf_hash)
            while compact.size == target:
                found[target] = compact.root()
                target = next(pending, 0)
            if not target:
                break
    finally:
        rows.close()
    return found


# -- the process cache for proofs -------------------------------------------------------------


@dataclass
class _CachedTree:
    tree: merkle.MerkleTree
    last_hash: str  # the chain hash of the tree's last leaf, to notice a changed database


_trees: dict[str, _CachedTree] = {}
_trees_lock = threading.Lock()


def _database_key(session: DbSession) -> str:
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    return engine.url.render_as_string(hide_password=True)


def chain_tree(session: DbSession, size: int, *, fresh: bool = False) -> merkle.MerkleTree:
    """A Merkle tree of at least ``size`` leaves of the stored chain, cached for the process.

    The first call hashes every event; later ones only the events added since (and one query
    to check that the cached last leaf is still in the database), so a proof costs O(log n)
    hashing. ``fresh`` rebuilds it: for when its root does not match a signed one.
    """
    key = _database_key(session)
    with _trees_lock:
        cached = None if fresh else _trees.get(key)
        if cached is not None and len(cached.tree):
            stored = session.scalar(
                select(AuditEvent.hash).where(AuditEvent.seq == len(cached.tree))
            )
            if stored != cached.last_hash:
                cached = None
        if cached is None:
            cached = _CachedTree(merkle.MerkleTree([]), "")
        if len(cached.tree) < size:
            rows = _stored_rows(session, len(cached.tree))
            try:
                for row in rows:
                    if row[0] != len(cached.tree) + 1 or row[0] > size:
                        break
                    cached.tree.append(row_leaf_hash(row))
                    cached.last_hash = row[10]
            finally:
                rows.close()
        _trees[key] = cached
        return cached.tree


def consistency_from_chain(session: DbSession, old_size: int, new_size: int) -> list[bytes]:
    """A consistency proof between two sizes of the stored chain's tree (for the signer)."""
    tree = chain_tree(session, new_size)
    if len(tree) < new_size:
        raise ValueError(f"the chain holds fewer than {new_size} events")
    return tree.consistency_proof(old_size, new_size)


def forget_trees() -> None:
    """Drop the cached trees (tests that rebuild a database under the same address)."""
    with _trees_lock:
        _trees.clear()
