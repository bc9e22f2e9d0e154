"""C2SP signed notes (c2sp.org/signed-note): text signed by one or more Ed25519 keys.

A checkpoint travels as a signed note: its text, a blank line, and one line per signature,
``— <key name> base64(key id || signature)``. A reader trusts a note only when a key it was
configured with signed it; signatures from keys it does not know are kept, unverified, so that
witnesses' cosignatures and a rotated log key can ride along without breaking older readers.
A signature from a known key that does not verify makes the whole note unusable: someone
tampered with it.

Keys are text. A verifier key (vkey) is ``name+hex(key id)+base64(type || public key)`` and a
signer key (skey) is ``PRIVATE+KEY+name+hex(key id)+base64(type || seed)``, as
golang.org/x/mod/sumdb/note spells them, with key id = SHA-256(name || "\\n" || type ||
public key)[:4]. Two types are supported: 0x01, a plain Ed25519 signature of the text, and
0x04, the timestamped cosignature of c2sp.org/tlog-cosignature, which signs
``cosignature/v1\\ntime <t>\\n`` followed by the text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from intake_verify.encoding import b64decode, b64encode

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
_ALGS = (ALG_ED25519, ALG_COSIGNATURE_V1)
_SIG_PREFIX = "\u2014 "  # em dash, space
# The spec asks verifiers to accept at least 16; Go's reference implementation stops at 100.
MAX_SIGNATURES = 100


class NoteError(Exception):
    """A note, a key, or a signature is malformed, forged, or not from a trusted key."""


def key_id(name: str, alg: int, public_key: bytes) -> int:
    """The 32-bit key id: SHA-256(name || "\\n" || alg || public key)[:4], big-endian."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def cosignature_message(text: str, timestamp: int) -> bytes:
    """What a tlog-cosignature/v1 (type 0x04) signs: a header, the time, then the note text."""
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"bad key name {name!r}: it must be non-empty, without spaces or '+'")


def _split_key(text: str, parts: int, what: str) -> list[str]:
    # The base64 part may itself contain '+', so split from the left only.
    fields = text.strip().split("+", parts - 1)
    if len(fields) != parts:
        raise NoteError(f"malformed {what}")
    return fields


def _parse_key(name: str, hex_id: str, encoded: str, what: str) -> tuple[int, int, bytes]:
    _check_name(name)
    try:
        material = b64decode(encoded)
    except ValueError as exc:
        raise NoteError(f"malformed {what}: {exc}") from exc
    if len(hex_id) != 8 or hex_id != hex_id.lower():
        raise NoteError(f"malformed {what}: the key id must be 8 lowercase hex digits")
    try:
        claimed_id = int(hex_id, 16)
    except ValueError as exc:
        raise NoteError(f"malformed {what}: the key id is not hex") from exc
    if len(material) != 33 or material[0] not in _ALGS:
        raise NoteError(f"malformed {what}: not an Ed25519 key of a known type")
    return claimed_id, material[0], material[1:]


@dataclass(frozen=True)
class Verifier:
    """A public key that checks one signer's signatures on notes."""

    name: str
    key_id: int
    alg: int
    public_key: Ed25519PublicKey = field(repr=False, compare=False)

    @classmethod
    def from_vkey(cls, vkey: str) -> Verifier:
        """Parse ``name+hex8+base64(type || public key)``."""
        name, hex_id, encoded = _split_key(vkey, 3, "verifier key")
        claimed_id, alg, raw = _parse_key(name, hex_id, encoded, "verifier key")
        if key_id(name, alg, raw) != claimed_id:
            raise NoteError("malformed verifier key: the key id does not match the key")
        return cls(name, claimed_id, alg, Ed25519PublicKey.from_public_bytes(raw))

    def vkey(self) -> str:
        """This key as a vkey string."""
        raw = self.public_key.public_bytes_raw()
        return f"{self.name}+{self.key_id:08x}+{b64encode(bytes([self.alg]) + raw)}"

    def verifies(self, text: str, signature: bytes) -> bool:
        """Whether ``signature`` (without the key id) is this key's signature of ``text``."""
        if self.alg == ALG_COSIGNATURE_V1:
            if len(signature) != 8 + 64:
                return False
            timestamp = int.from_bytes(signature[:8], "big")
            if timestamp >= 1 << 63:
                return False
            message, signature = cosignature_message(text, timestamp), signature[8:]
        else:
            message = text.encode()
        try:
            self.public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """A private key that signs notes (type 0x01) or cosigns checkpoints (type 0x04)."""

    name: str
    key_id: int
    alg: int
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)

    @classmethod
    def from_skey(cls, skey: str) -> Signer:
        """Parse ``PRIVATE+KEY+name+hex8+base64(type || seed)``."""
        private, key, name, hex_id, encoded = _split_key(skey, 5, "signer key")
        if (private, key) != ("PRIVATE", "KEY"):
            raise NoteError("malformed signer key: it must start with PRIVATE+KEY+")
        claimed_id, alg, seed = _parse_key(name, hex_id, encoded, "signer key")
        private_key = Ed25519PrivateKey.from_private_bytes(seed)
        if key_id(name, alg, private_key.public_key().public_bytes_raw()) != claimed_id:
            raise NoteError("malformed signer key: the key id does not match the key")
        return cls(name, claimed_id, alg, private_key)

    def verifier(self) -> Verifier:
        """The matching public key."""
        return Verifier(self.name, self.key_id, self.alg, self.private_key.public_key())

    def signature_line(self, signature: bytes) -> str:
        """``— name base64(key id || signature)`` and a newline."""
        return f"{_SIG_PREFIX}{self.name} {b64encode(self.key_id.to_bytes(4, 'big') + signature)}\n"


def generate_key(name: str, alg: int = ALG_ED25519) -> tuple[str, str]:
    """A new key pair as ``(skey, vkey)``; ``alg=ALG_COSIGNATURE_V1`` for a witness."""
    _check_name(name)
    if alg not in _ALGS:
        raise NoteError(f"unknown signature type {alg}")
    private_key = Ed25519PrivateKey.generate()
    seed = private_key.private_bytes_raw()
    kid = key_id(name, alg, private_key.public_key().public_bytes_raw())
    skey = f"PRIVATE+KEY+{name}+{kid:08x}+{b64encode(bytes([alg]) + seed)}"
    return skey, Signer.from_skey(skey).verifier().vkey()


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("a note's text must end with a newline")
    if any(c < " " and c != "\n" for c in text):
        raise NoteError("a note must not contain control characters")


def sign_note(text: str, signer: Signer) -> str:
    """Sign ``text`` (which ends in a newline) as a note with one Ed25519 signature."""
    _check_text(text)
    if signer.alg != ALG_ED25519:
        raise NoteError("a cosigner key cosigns checkpoints; it does not sign notes")
    return text + "\n" + signer.signature_line(signer.private_key.sign(text.encode()))


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a note; ``verified`` only if a trusted key checked it."""

    name: str
    key_id: int
    signature: bytes = field(repr=False)
    verified: bool


@dataclass(frozen=True)
class OpenedNote:
    """A note's text and its signatures, grouped by key name."""

    text: str
    signatures_by_name: dict[str, list[NoteSignature]]

    def verified_by(self, verifier: Verifier) -> NoteSignature | None:
        """The signature of ``verifier`` on this note, if it checked out."""
        for sig in self.signatures_by_name.get(verifier.name, []):
            if sig.verified and sig.key_id == verifier.key_id:
                return sig
        return None


def split_note(note: str) -> tuple[str, list[NoteSignature]]:
    """Split a note into its text and its (unverified) signatures, checking only the syntax."""
    try:
        note.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NoteError("a note must be valid UTF-8") from exc
    if any(c < " " and c != "\n" for c in note):
        raise NoteError("a note must not contain control characters")
    if not note.endswith("\n"):
        raise NoteError("a note must end with a newline")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("a note needs a blank line before its signatures")
    text, lines = note[: cut + 1], note[cut + 2 :].splitlines()
    if not lines:
        raise NoteError("a note has no signatures")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"a note may carry at most {MAX_SIGNATURES} signatures")
    signatures = []
    for line in lines:
        name, _, encoded = line.removeprefix(_SIG_PREFIX).partition(" ")
        if not line.startswith(_SIG_PREFIX) or not encoded:
            raise NoteError(f"malformed signature line {line!r}")
        _check_name(name)
        try:
            raw = b64decode(encoded)
        except ValueError as exc:
            raise NoteError(f"malformed signature line {line!r}: {exc}") from exc
        if len(raw) < 5:
            raise NoteError(f"malformed signature line {line!r}: too short")
        signatures.append(NoteSignature(name, int.from_bytes(raw[:4], "big"), raw[4:], False))
    return text, signatures


def open_note(note: str, verifiers: list[Verifier] | tuple[Verifier, ...]) -> OpenedNote:
    """Check a note's signatures against ``verifiers``; refuse it unless one of them signed.

    Raises NoteError when the note is malformed, when a trusted key's signature does not
    verify (the note was altered), or when no trusted key signed it.
    """
    text, signatures = split_note(note)
    by_identity = {(v.name, v.key_id): v for v in verifiers}
    opened: dict[str, list[NoteSignature]] = {}
    any_verified = False
    for sig in signatures:
        verifier = by_identity.get((sig.name, sig.key_id))
        if verifier is not None:
            if not verifier.verifies(text, sig.signature):
                raise NoteError(f"the signature of {sig.name} does not verify")
            sig = NoteSignature(sig.name, sig.key_id, sig.signature, True)
            any_verified = True
        opened.setdefault(sig.name, []).append(sig)
    if not any_verified:
        raise NoteError("the note is not signed by a trusted key")
    return OpenedNote(text, opened)
