"""Seal and open protected health information; blind indexes; the keyring.

Why: a copy of the database (a backup, a replica, a stolen disk) must not reveal any patient's
data. Each request's PHI is one canonical JSON document sealed with AES-256-GCM under a fresh
256-bit data key. The data key is wrapped by the keyring's primary key-encryption key (KEK), so
rotating a KEK rewraps 32 bytes per request instead of re-encrypting documents, and deleting a
request's wrapped data key makes its PHI unrecoverable (crypto-shredding).

The associated data binds every ciphertext to its row id and purpose, so a ciphertext copied onto
another row, or a note's ciphertext passed off as the request's PHI, fails to open. Opening never
returns wrong data: any failure raises a :class:`SealError`.

Blind indexes (HMAC-SHA256 under a key apart from the KEKs) let staff find a request by an exact
phone, e-mail, or last name and date of birth without decrypting every row. They assume the
attacker does not hold the index key; with it, low-entropy values can be guessed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
FORMAT_VERSION = b"\x01"


class SealError(Exception):
    """A sealed value cannot be opened."""


class UnknownKeyError(SealError):
    """The sealed value names a key id the keyring does not hold."""


class TamperedError(SealError):
    """The ciphertext, its key, row or purpose do not match: it was altered or moved."""


class KeyringError(ValueError):
    """A keyring document is malformed."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise KeyringError(f"{what} is not base64") from None
    if len(raw) != KEY_BYTES:
        raise KeyringError(f"{what} must be {KEY_BYTES} bytes")
    return raw


@dataclass(frozen=True)
class Keyring:
    """Versioned key-encryption keys plus the keys for blind indexes and IP pseudonyms."""

    primary: str
    keks: Mapping[str, bytes]
    index_key: bytes
    ip_key: bytes

    @classmethod
    def generate(cls) -> Keyring:
        return cls(
            primary="k1",
            keks={"k1": AESGCM.generate_key(bit_length=256)},
            index_key=secrets.token_bytes(KEY_BYTES),
            ip_key=secrets.token_bytes(KEY_BYTES),
        )

    @classmethod
    def from_json(cls, text: str) -> Keyring:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise KeyringError("keyring is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keks"), dict):
            raise KeyringError("keyring needs 'primary', 'keks', 'index_key' and 'ip_key'")
        keks = {str(k): _unb64(v, f"KEK {k}") for k, v in doc["keks"].items()}
        primary = doc.get("primary")
        if primary not in keks:
            raise KeyringError("keyring's primary key id is not among its keks")
        return cls(
            primary=primary,
            keks=keks,
            index_key=_unb64(doc.get("index_key", ""), "index_key"),
            ip_key=_unb64(doc.get("ip_key", ""), "ip_key"),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "primary": self.primary,
                "keks": {k: _b64(v) for k, v in self.keks.items()},
                "index_key": _b64(self.index_key),
                "ip_key": _b64(self.ip_key),
            },
            indent=2,
            sort_keys=True,
        )

    def with_new_primary(self) -> Keyring:
        """Return a keyring with a fresh primary KEK; older KEKs stay to open old rows."""
        numbers = [int(k[1:]) for k in self.keks if k.startswith("k") and k[1:].isdigit()]
        key_id = f"k{max(numbers, default=0) + 1}"
        keks = dict(self.keks)
        keks[key_id] = AESGCM.generate_key(bit_length=256)
        return Keyring(primary=key_id, keks=keks, index_key=self.index_key, ip_key=self.ip_key)

    def kek(self, key_id: str) -> bytes:
        try:
            return self.keks[key_id]
        except KeyError:
            raise UnknownKeyError(f"unknown key id {key_id!r}") from None


@dataclass(frozen=True)
class WrappedKey:
    """A data key wrapped by the KEK named ``kek_id``; this is what the database stores."""

    kek_id: str
    blob: bytes


def _aad(purpose: str, row_id: str, *extra: str) -> bytes:
    return "|".join(("intake", "v1", purpose, row_id, *extra)).encode()


def new_data_key(keyring: Keyring, row_id: str) -> tuple[bytes, WrappedKey]:
    """Make a fresh data key for ``row_id`` and wrap it with the primary KEK."""
    data_key = AESGCM.generate_key(bit_length=256)
    return data_key, wrap_data_key(keyring, row_id, data_key)


def wrap_data_key(keyring: Keyring, row_id: str, data_key: bytes) -> WrappedKey:
    kek_id = keyring.primary
    nonce = os.urandom(NONCE_BYTES)
    blob = nonce + AESGCM(keyring.kek(kek_id)).encrypt(nonce, data_key, _aad("dek", row_id, kek_id))
    return WrappedKey(kek_id=kek_id, blob=blob)


def unwrap_data_key(keyring: Keyring, row_id: str, wrapped: WrappedKey) -> bytes:
    """Unwrap a row's data key; a wrong row, key id or altered blob raises."""
    kek = keyring.kek(wrapped.kek_id)
    nonce, body = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
    try:
        return AESGCM(kek).decrypt(nonce, body, _aad("dek", row_id, wrapped.kek_id))
    except (InvalidTag, ValueError):
        raise TamperedError("data key does not open for this row") from None


def canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(data_key: bytes, row_id: str, purpose: str, document: Mapping[str, Any]) -> bytes:
    """Encrypt ``document`` for ``row_id`` and ``purpose`` under ``data_key``."""
    nonce = os.urandom(NONCE_BYTES)
    body = AESGCM(data_key).encrypt(nonce, canonical_json(document), _aad(purpose, row_id))
    return FORMAT_VERSION + nonce + body


def open_sealed(data_key: bytes, row_id: str, purpose: str, sealed: bytes) -> dict[str, Any]:
    """Decrypt what :func:`seal` made; any mismatch raises :class:`TamperedError`."""
    if not sealed or sealed[:1] != FORMAT_VERSION:
        raise TamperedError("unknown sealed format")
    nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
    try:
        plain = AESGCM(data_key).decrypt(nonce, body, _aad(purpose, row_id))
    except (InvalidTag, ValueError):
        raise TamperedError(f"{purpose} does not open for this row") from None
    document: dict[str, Any] = json.loads(plain)
    return document


@dataclass(frozen=True)
class SealedPHI:
    wrapped_key: WrappedKey
    ciphertext: bytes


PHI_PURPOSE = "phi"
DISPLAY_PURPOSE = "display"


def seal_phi(keyring: Keyring, row_id: str, document: Mapping[str, Any]) -> SealedPHI:
    """Seal a request's PHI document under a fresh data key."""
    data_key, wrapped = new_data_key(keyring, row_id)
    return SealedPHI(wrapped, seal(data_key, row_id, PHI_PURPOSE, document))


def open_phi(keyring: Keyring, row_id: str, sealed: SealedPHI) -> dict[str, Any]:
    """Open a request's PHI document; raises :class:`SealError` rather than return wrong data."""
    data_key = unwrap_data_key(keyring, row_id, sealed.wrapped_key)
    return open_sealed(data_key, row_id, PHI_PURPOSE, sealed.ciphertext)


# -- blind indexes ---------------------------------------------------------------------------


def normalize_email(value: str) -> str:
    return value.strip().lower()


def normalize_name(value: str) -> str:
    """Fold case and accents and drop everything but letters: 'Núñez-Ortiz' -> 'nunezortiz'."""
    decomposed = unicodedata.normalize("NFKD", value.casefold())
    return "".join(c for c in decomposed if c.isalpha() and not unicodedata.combining(c))


def blind_index(keyring: Keyring, field: str, normalized: str) -> str:
    """HMAC-SHA256 of an already normalized value, separated by field name."""
    message = field.encode() + b"\x00" + normalized.encode()
    return hmac.new(keyring.index_key, message, hashlib.sha256).hexdigest()


def phone_index(keyring: Keyring, e164: str) -> str:
    return blind_index(keyring, "phone", e164)


def email_index(keyring: Keyring, email: str) -> str:
    return blind_index(keyring, "email", normalize_email(email))


def name_dob_index(keyring: Keyring, last_name: str, date_of_birth: str) -> str:
    return blind_index(keyring, "name_dob", f"{normalize_name(last_name)}|{date_of_birth}")


def ip_pseudonym(keyring: Keyring, ip: str | None) -> str | None:
    """Pseudonymize a client IP for the audit trail: equal IPs compare equal, none is revealed."""
    if not ip:
        return None
    return hmac.new(keyring.ip_key, ip.encode(), hashlib.sha256).hexdigest()[:32]


# An IPv6 customer usually gets a whole /64 (often more): counting each of its 2**64 addresses
# as a client of its own would give one attacker as many budgets as they like.
IPV6_CLIENT_PREFIX = 64


def client_network(ip: str) -> str:
    """The network that counts as one client: an IPv4 address itself, an IPv6 address's /64.

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) counts as its IPv4 address, and a string
    that is no address is returned as it is, so it still names one client.
    """
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False)
        return str(network)
    return str(address)


def client_pseudonym(keyring: Keyring, ip: str | None) -> str | None:
    """Pseudonymize the client *network* of an IP, for rate limits and login throttles.

    Unlike :func:`ip_pseudonym` (the audit trail's exact address), every address of one IPv6
    /64 gets the same pseudonym, so rotating through them earns an attacker nothing.
    """
    if not ip:
        return None
    return ip_pseudonym(keyring, client_network(ip))
