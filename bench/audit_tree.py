"""Measure the Merkle tree, the anchor and the proofs of the audit trail.

Writes N realistic events into a temporary SQLite database (and, with --postgres, a temporary
PostgreSQL database) with an anchor file vouching for them, then times four things, each
against a bare baseline measured in the same run:

- root: the Merkle root of the whole chain as the signer's first checkpoint computes it
  (``intake.audit.tree.extend_range`` from an empty compact range), against reading the same
  rows and hashing each once (bench/audit_verify.py's baseline);
- anchor: ``intake.audit.anchor.compare`` over the whole anchor file, as ``intake audit
  verify`` runs it, against reading the same file line by line and splitting each line;
- proof: ``intake.audit.proofs.build_request_proof`` for one request of about 20 events, the
  first in a fresh process cache and then the median of later ones, against an
  ``intake_verify.merkle.MerkleTree`` built from precomputed leaf hashes plus one
  ``inclusion_proof`` per event (for the later proofs: the proofs alone, on the built tree);
- verify_proof: ``intake_verify.proof.verify_proof`` of that proof file, against one Ed25519
  verify plus the inclusion paths hashed by hand.

The ratio (time / baseline time) is what to compare between machines and versions.

    .venv/bin/python bench/audit_tree.py                       # 100,000 events, SQLite
    .venv/bin/python bench/audit_tree.py --postgres            # and the local PostgreSQL
    .venv/bin/python bench/audit_tree.py --events 1000000 --postgres postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
import structlog
from audit_verify import (  # the same generator, engines and baseline as the verify bench
    DEFAULT_POSTGRES,
    INSERT_BATCH,
    best_of,
    fake_events,
    postgres_engine,
    run_baseline,
    sqlite_engine,
)
from sqlalchemy.orm import Session

from config import Settings
from intake.audit import anchor, keys
from intake.audit.chain import GENESIS_HASH, _stored_rows, event_hash
from intake.audit.checkpoints import write_checkpoint
from intake.audit.proofs import RequestProof, build_request_proof
from intake.audit.tree import CompactRange, extend_range, forget_trees, row_leaf_hash
from intake.models import AuditEvent
from intake_verify.encoding import b64decode
from intake_verify.leaf import leaf_data
from intake_verify.merkle import MerkleTree
from intake_verify.note import Verifier, split_note
from intake_verify.proof import verify_proof

ORIGIN = "bench.intake.invalid/intake-audit"
# A reference the generator never writes (it writes R-1000 to R-9999), given to about
# --request-events events spread over the whole chain: the request whose proof is timed.
REQUEST = "R-0999-BENCH"
MEASURES = ("root", "anchor", "proof first", "proof later", "verify_proof")


def trail(count: int, request_events: int) -> Iterator[dict[str, Any]]:
    """bench/audit_verify.py's events, with REQUEST on ``request_events`` of them, re-chained."""
    step = max(1, count // request_events)
    chosen = set(range(step // 2 + 1, count + 1, step)[:request_events])
    prev = GENESIS_HASH
    for row in fake_events(count):
        if row["seq"] in chosen:
            row["reference"] = REQUEST
        row["prev_hash"] = prev
        row["hash"] = prev = event_hash(prev, SimpleNamespace(**row))  # type: ignore[arg-type]
        yield row


def fill(engine: sa.Engine, rows: Iterable[dict[str, Any]]) -> None:
    table: sa.Table = AuditEvent.__table__  # type: ignore[assignment]
    table.create(engine)
    with engine.begin() as conn:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == INSERT_BATCH:
                conn.execute(table.insert(), batch)
                batch = []
        if batch:
            conn.execute(table.insert(), batch)
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE audit_events")


def write_anchor(path: Path, engine: sa.Engine) -> None:
    """The anchor file record_event would have written: a baseline, then p and c per event."""
    lines = [f"{anchor.BASELINE} 0 {GENESIS_HASH}\n"]
    with Session(engine) as session:
        for seq, digest in session.execute(
            sa.select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq)
        ):
            lines.append(f"{anchor.PREPARED} {seq} {digest}\n{anchor.COMMITTED} {seq} {digest}\n")
    path.write_text("".join(lines), encoding="ascii")


# -- 1. the root ------------------------------------------------------------------------------


def run_root(engine: sa.Engine, count: int) -> bytes:
    """The root the signer's first checkpoint signs (_sign_tree_head with no last head)."""
    with Session(engine) as session:
        compact = extend_range(session, CompactRange(), count)
    assert compact.size == count, (compact.size, count)
    return compact.root()


# -- 2. the anchor ----------------------------------------------------------------------------


def run_compare(engine: sa.Engine, sink: anchor.FileAnchor) -> int:
    with Session(engine) as session:
        report = anchor.compare(session, sink)
    if not report.ok:
        raise SystemExit(f"anchor compare failed on a clean trail: {report}")
    return report.events


def run_anchor_baseline(path: Path) -> int:
    """Read the same file line by line and split each line: the floor compare cannot beat."""
    lines = 0
    with path.open("rb") as handle:
        for line in handle:
            line.split(b" ")
            lines += 1
    return lines


# -- 3. a request's proof ---------------------------------------------------------------------


def run_proof(engine: sa.Engine, settings: Settings) -> RequestProof:
    with Session(engine) as session:
        return build_request_proof(session, settings, REQUEST, openings=False)


def run_tree_baseline(leaves: list[bytes], indexes: list[int]) -> int:
    tree = MerkleTree(leaves)
    return sum(len(tree.inclusion_proof(i)) for i in indexes)


def run_paths_baseline(tree: MerkleTree, indexes: list[int]) -> int:
    return sum(len(tree.inclusion_proof(i)) for i in indexes)


# -- 4. checking the proof file ---------------------------------------------------------------


def hand_root(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 2.1.3.2, with no checks: what any verifier of an inclusion path must hash."""
    sha256 = hashlib.sha256
    fn, sn, r = index, size - 1, sha256(b"\x00" + leaf).digest()
    for p in path:
        if fn & 1 or fn == sn:
            r = sha256(b"\x01" + p + r).digest()
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return r


def verify_baseline(proof: RequestProof, verifier: Verifier, root: bytes) -> Callable[[], int]:
    """One Ed25519 verify of the checkpoint note and every inclusion path hashed by hand."""
    text, [signature] = split_note(proof.data["checkpoint"])
    message, raw_signature, public_key = text.encode(), signature.signature, verifier.public_key
    events = [
        (e["leaf_index"], leaf_data(e["leaf"]), [b64decode(h) for h in e["inclusion"]])
        for e in proof.events
    ]
    size = proof.size

    def work() -> int:
        public_key.verify(raw_signature, message)
        for index, data, path in events:
            if hand_root(index, size, data, path) != root:
                raise SystemExit("the hand-hashed path does not lead to the signed root")
        return len(events)

    return work


def median_of(samples: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def row(
    label: str, measure: str, count: int, seconds: float, per: float, unit: str, baseline: float
) -> dict[str, Any]:
    return {
        "backend": label,
        "measure": measure,
        "events": count,
        "seconds": seconds,
        "rate": per / seconds,
        "rate_unit": unit,
        "baseline_s": baseline,
        "ratio": seconds / baseline,
    }


def measure(
    label: str, engine: sa.Engine, args: argparse.Namespace, folder: Path
) -> list[dict[str, Any]]:
    count, repeat, samples = args.events, args.repeat, args.samples
    request_events = min(args.request_events, count)
    fill(engine, trail(count, request_events))
    anchor_path = folder / anchor.ANCHOR_FILE
    write_anchor(anchor_path, engine)
    skey, vkey = keys.generate_keys(ORIGIN)
    settings = Settings(
        data_dir=folder,
        audit_signing_key=skey,
        audit_verify_keys=vkey,
        audit_origin=ORIGIN,
        audit_anchor=anchor_path,
    )
    run_baseline(engine)  # warm the caches for all of them
    results = []

    # 1. The root of the whole chain against reading and hashing each row once.
    root_s, _ = best_of(repeat, lambda: len(run_root(engine, count)))
    base_s, hashed = best_of(repeat, lambda: run_baseline(engine))
    assert hashed == count, (hashed, count)
    results.append(row(label, "root", count, root_s, count, "events/s", base_s))

    # 2. The anchor comparison against reading and splitting the same file.
    sink = anchor.FileAnchor(anchor_path)
    compare_s, compared = best_of(repeat, lambda: run_compare(engine, sink))
    base_s, lines = best_of(repeat, lambda: run_anchor_baseline(anchor_path))
    assert compared == count and lines == 2 * count + 1, (compared, lines, count)
    results.append(row(label, "anchor", count, compare_s, count, "events/s", base_s))

    # The signer's first checkpoint (the root above, signed): what the proofs are built on.
    # It records audit.checkpointed (event N + 1, not in the anchor file): measured after 2.
    with Session(engine) as session:
        signed = write_checkpoint(session, settings, actor="system:signer")
    assert signed is not None and signed.seq == count, signed
    with Session(engine) as session:
        rows = _stored_rows(session, 0)
        leaves = [row_leaf_hash(r) for r in rows if r[0] <= count]
    root = MerkleTree(leaves).root()
    assert root == run_root(engine, count)

    # 3. A request's proof: first in a fresh process cache, then from the cached tree.
    def first_proof() -> int:
        forget_trees()
        return len(run_proof(engine, settings).events)

    first_s, proven = best_of(repeat, first_proof)
    proof = run_proof(engine, settings)
    indexes = [e["leaf_index"] for e in proof.events]
    assert proven == len(indexes) == request_events and proof.pending == 0, (proven, proof.data)
    base_s, _ = best_of(repeat, lambda: run_tree_baseline(leaves, indexes))
    results.append(row(label, "proof first", count, first_s, 1, "proofs/s", base_s))
    later_s = median_of(samples, lambda: run_proof(engine, settings))
    tree = MerkleTree(leaves)
    base_s = median_of(samples, lambda: run_paths_baseline(tree, indexes))
    results.append(row(label, "proof later", count, later_s, 1, "proofs/s", base_s))
    forget_trees()

    # 4. Checking the proof file offline against one signature and the paths hashed by hand.
    text = proof.to_json()
    verifier = Verifier.from_vkey(vkey)

    def check() -> int:
        report = verify_proof(text, [verifier])
        if not report.ok or len(report.events) != request_events:
            raise SystemExit(f"verify_proof failed on a good proof: {report.problem}")
        return len(report.events)

    verify_s = median_of(samples, check)
    base_s = median_of(samples, verify_baseline(proof, verifier, root))
    results.append(row(label, "verify_proof", count, verify_s, 1, "files/s", base_s))
    return results


BASELINES = {
    "root": "read the same rows, one SHA-256 over each row's fields",
    "anchor": "read the same anchor file line by line, split each line",
    "proof first": "MerkleTree(precomputed leaf hashes) + one inclusion_proof per event",
    "proof later": "one inclusion_proof per event on that built tree",
    "verify_proof": "one Ed25519 verify + each inclusion path hashed by hand",
}


def print_table(results: list[dict[str, Any]], request_events: int) -> None:
    print("| backend | measure | seconds | rate | baseline s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rate = f"{r['rate']:,.{0 if r['rate'] >= 100 else 2}f} {r['rate_unit']}"
        print(
            f"| {r['backend']} | {r['measure']} | {r['seconds']:.6f} | {rate} | "
            f"{r['baseline_s']:.6f} | {r['ratio']:.2f} |"
        )
    print(f"\nevents: {results[0]['events']:,}; the proven request has {request_events} events.")
    print("baselines:")
    for name, what in BASELINES.items():
        print(f"  {name}: {what}")
    print(
        "ratio = seconds / baseline s. root, anchor and proof first: best of the repeats;"
        "\nproof later and verify_proof: the median of the samples."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events to generate")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument(
        "--samples", type=int, default=25, help="later proofs and proof checks; the median counts"
    )
    parser.add_argument(
        "--request-events", type=int, default=20, help="events of the request that is proven"
    )
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=DEFAULT_POSTGRES,
        default=None,
        metavar="URL",
        help="also measure PostgreSQL (a server URL; a temporary database is made and dropped)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    if min(args.events, args.repeat, args.samples, args.request_events) < 1:
        parser.error("--events, --repeat, --samples and --request-events must be at least 1")
    # The checkpoint's "signed" line would land in the middle of the report.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = []
    with sqlite_engine() as engine, tempfile.TemporaryDirectory(prefix="intake-bench-") as d:
        results += measure("sqlite", engine, args, Path(d))
    if args.postgres:
        with (
            postgres_engine(args.postgres) as engine,
            tempfile.TemporaryDirectory(prefix="intake-bench-") as d,
        ):
            results += measure("postgresql", engine, args, Path(d))
    print_table(results, min(args.request_events, args.events))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
