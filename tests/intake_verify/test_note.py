"""Signed notes, checkpoints and cosignatures: the published examples and forged signatures."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from intake_verify.checkpoint import Checkpoint, CheckpointError, time_extension
from intake_verify.cosignature import cosign, verify_cosignature
from intake_verify.merkle import EMPTY_ROOT
from intake_verify.note import (
    ALG_COSIGNATURE_V1,
    NoteError,
    Signer,
    Verifier,
    generate_key,
    open_note,
    sign_note,
)

# The example key and note of golang.org/x/mod/sumdb/note (its package documentation and
# note_test.go): Ed25519 is deterministic, so signing the text must give this exact note.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2p"
    "ZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
# The example of the C2SP signed-note specification, "Verifier keys" section.
C2SP_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
C2SP_NOTE = (
    "This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfX"
    "ppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)


def test_go_reference_key_signs_the_reference_note() -> None:
    signer = Signer.from_skey(GO_SKEY)
    assert signer.verifier().vkey() == GO_VKEY
    assert signer.key_id == 0xC74F20A3
    assert sign_note(GO_TEXT, signer) == GO_NOTE
    opened = open_note(GO_NOTE, [Verifier.from_vkey(GO_VKEY)])
    assert opened.text == GO_TEXT
    assert [s.verified for s in opened.signatures_by_name["PeterNeumann"]] == [True]


def test_c2sp_example_note_verifies() -> None:
    opened = open_note(C2SP_NOTE, [Verifier.from_vkey(C2SP_VKEY)])
    assert opened.text == "This is an example message.\n"


def test_a_forged_signature_is_refused() -> None:
    verifier = Verifier.from_vkey(GO_VKEY)
    forged = GO_NOTE.replace("x08go/ZJ", "x08go/ZK")  # same key id, other signature bytes
    with pytest.raises(NoteError, match="does not verify"):
        open_note(forged, [verifier])
    with pytest.raises(NoteError, match="does not verify"):
        open_note(GO_NOTE.replace("answer", "Answer"), [verifier])  # altered text


def test_a_missing_or_unknown_signature_is_refused() -> None:
    verifier = Verifier.from_vkey(GO_VKEY)
    with pytest.raises(NoteError, match="blank line|no signatures"):
        open_note(GO_TEXT, [verifier])
    with pytest.raises(NoteError, match="no signatures"):
        open_note(GO_TEXT + "\n", [verifier])
    # Signed, but by a key the reader does not trust: kept, unverified, and the note refused.
    with pytest.raises(NoteError, match="not signed by a trusted key"):
        open_note(C2SP_NOTE, [verifier])
    other_skey, _ = generate_key("PeterNeumann")  # same name, other key id
    with pytest.raises(NoteError, match="not signed by a trusted key"):
        open_note(sign_note(GO_TEXT, Signer.from_skey(other_skey)), [verifier])


def test_unknown_signatures_ride_along() -> None:
    skey, vkey = generate_key("intake.example/audit")
    note = sign_note(GO_TEXT, Signer.from_skey(skey)) + GO_NOTE.splitlines(keepends=True)[-1]
    opened = open_note(note, [Verifier.from_vkey(vkey)])
    assert opened.signatures_by_name["intake.example/audit"][0].verified
    assert not opened.signatures_by_name["PeterNeumann"][0].verified


@pytest.mark.parametrize(
    "note",
    [
        GO_NOTE.replace("\u2014", "-"),
        GO_NOTE.replace("then", "th\x01en"),
        GO_NOTE.replace("JnAM=", "JnAN="),  # non-canonical base64: unused bits set
        GO_NOTE[:-1],
        GO_NOTE.replace("PeterNeumann x", "Peter+Neumann x"),
    ],
)
def test_malformed_notes_are_refused(note: str) -> None:
    with pytest.raises(NoteError):
        open_note(note, [Verifier.from_vkey(GO_VKEY)])


@pytest.mark.parametrize(
    "vkey",
    [
        GO_VKEY.replace("c74f20a3", "c74f20a4"),  # id does not match the key
        GO_VKEY.replace("+ARpc", "+AhpC"),  # unknown type
        "PeterNeumann+c74f20a3",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_malformed_vkeys_are_refused(vkey: str) -> None:
    with pytest.raises(NoteError):
        Verifier.from_vkey(vkey)


def test_checkpoint_body_round_trips_and_rejects_near_misses() -> None:
    moment = datetime(2026, 11, 24, 10, 39, 14, tzinfo=UTC)
    checkpoint = Checkpoint(
        "intake.example/audit", 20852163, bytes(range(32)), (time_extension(moment),)
    )
    body = checkpoint.body()
    assert body == (
        "intake.example/audit\n20852163\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
        "time 2026-11-24T10:39:14Z\n"
    )
    assert Checkpoint.parse(body) == checkpoint
    assert Checkpoint.parse(body).time == moment
    for bad in [
        body.replace("20852163", "020852163"),
        body.replace("20852163", "-1"),
        body.replace("AAEC", "AAE"),
        body[:-1],
        body + "\n",
        "intake.example/audit\n0\n",
        "\n0\n" + "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n",
    ]:
        with pytest.raises(CheckpointError):
            Checkpoint.parse(bad)


def test_c2sp_example_checkpoint_parses() -> None:
    # From c2sp.org/tlog-checkpoint.
    body = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    checkpoint = Checkpoint.parse(body)
    assert (checkpoint.origin, checkpoint.size, checkpoint.body()) == (
        "example.com/behind-the-sofa", 20852163, body,
    )  # fmt: skip


def test_cosignature_verifies_and_carries_its_time() -> None:
    log_skey, log_vkey = generate_key("intake.example/audit")
    witness_skey, witness_vkey = generate_key("witness.example/w1", ALG_COSIGNATURE_V1)
    witness = Signer.from_skey(witness_skey)
    body = Checkpoint("intake.example/audit", 0, EMPTY_ROOT).body()
    note = sign_note(body, Signer.from_skey(log_skey))
    line = cosign(body, witness, 1679315147)
    assert line.startswith("\u2014 witness.example/w1 ")
    cosigned = note + line
    assert verify_cosignature(cosigned, Verifier.from_vkey(witness_vkey)) == 1679315147
    # The log's own check still passes with the cosignature attached.
    open_note(cosigned, [Verifier.from_vkey(log_vkey)])
    with pytest.raises(NoteError, match="no valid cosignature"):
        verify_cosignature(note, Verifier.from_vkey(witness_vkey))
    # A cosignature over another time (or body) does not verify.
    _, _, encoded = line.rstrip("\n").partition("w1 ")
    other_time = cosign(body, witness, 1679315148)
    spliced = note + other_time[: other_time.index("w1 ") + 3 + 16] + encoded[16:] + "\n"
    with pytest.raises(NoteError):
        verify_cosignature(spliced, Verifier.from_vkey(witness_vkey))
    # A plain Ed25519 key cannot stand in for a cosigner and vice versa.
    with pytest.raises(NoteError):
        cosign(body, Signer.from_skey(log_skey), 1679315147)
    with pytest.raises(NoteError):
        sign_note(body, witness)
    assert witness.verifier().alg == ALG_COSIGNATURE_V1
