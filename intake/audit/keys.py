"""The audit log's keys: who may sign checkpoints, and how everyone else checks them.

Why: a checkpoint only proves something if the key that signed it is out of reach of whoever can
change the database or the app. So the private key lives with the signer alone (the
``intake audit signer`` process, or whatever runs ``intake audit checkpoint``): in production it
comes from ``INTAKE_AUDIT_SIGNING_KEY`` in the signer's own env file; in the embedded profile it
is generated into a folder only the signer reads (``<data dir>/signer/``, mode 0700). Web and
workers, ``intake audit verify`` and an outside auditor get public keys only
(``INTAKE_AUDIT_VERIFY_KEYS``; embedded: the file the signer writes next to the checkpoints).
Rotation adds a key: the old public keys stay listed, so old checkpoints keep verifying.

Keys are written in the C2SP signed-note formats (``intake_verify.note``): a private key
``PRIVATE+KEY+<name>+<hex8>+<base64(0x01 || seed)>`` and a verifier key
``<name>+<hex8>+<base64(0x01 || public key)>``, where the name is the log's origin
(:func:`log_origin`) and hex8 the key id, SHA-256(name || "\\n" || 0x01 || public key)[:4]. A
raw base64 Ed25519 key (the version 1 checkpoint format) is still read, as either kind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from config import Settings
from config.settings import read_secret_setting
from intake_verify import note

log = structlog.get_logger(__name__)

ALG_ED25519 = note.ALG_ED25519
SKEY_PREFIX = "PRIVATE+KEY+"
ORIGIN_SUFFIX = "/intake-audit"
# The embedded signer's folder and key file, and the public keys it publishes.
SIGNER_DIR = "signer"
SIGNER_KEY_FILE = "signing-key"
# Formerly the embedded key sat in the data folder, readable by web and workers.
LEGACY_KEY_FILE = "audit-signing-key"
PUBLIC_KEYS_FILE = "audit-verify-keys"
DEFAULT_CHECKPOINTS_FILE = "audit-checkpoints.jsonl"

BAD_SKEY = (
    "INTAKE_AUDIT_SIGNING_KEY must hold a private key as printed by `intake audit keys "
    "generate` (PRIVATE+KEY+...), or the path of a file holding it"
)
BAD_VKEY = (
    "INTAKE_AUDIT_VERIFY_KEYS must hold public keys as printed by `intake audit keys generate` "
    "(name+hex8+base64, separated by spaces, commas or new lines), or the path of a file of them"
)


class AuditKeyError(ValueError):
    """A key setting or key file cannot be read."""


def log_origin(settings: Settings) -> str:
    """The log's name on every checkpoint and key: ``<host of INTAKE_PUBLIC_URL>/intake-audit``."""
    if settings.audit_origin:
        return settings.audit_origin
    host = urlsplit(settings.public_url).hostname or "localhost"
    return host + ORIGIN_SUFFIX


def _key_hash(name: str, public_raw: bytes) -> bytes:
    return note.key_id(name, ALG_ED25519, public_raw).to_bytes(4, "big")


def _legacy_id(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:32]


@dataclass(frozen=True)
class AuditVerifier:
    """A public key that checks checkpoints: its name, C2SP key id and Ed25519 key."""

    name: str
    public_key: Ed25519PublicKey

    @property
    def raw(self) -> bytes:
        return self.public_key.public_bytes_raw()

    @property
    def key_hash(self) -> bytes:
        return _key_hash(self.name, self.raw)

    @property
    def key_id(self) -> str:
        """The fingerprint written on the version 1 checkpoint lines this key signs."""
        return _legacy_id(self.raw)

    @property
    def vkey(self) -> str:
        return (
            f"{self.name}+{self.key_hash.hex()}+"
            + base64.b64encode(bytes([ALG_ED25519]) + self.raw).decode()
        )

    def note_verifier(self) -> note.Verifier:
        """This key as an ``intake_verify.note.Verifier`` (for signed notes)."""
        return note.Verifier.from_vkey(self.vkey)


@dataclass(frozen=True)
class AuditSigner:
    """The private key that signs checkpoints. Only the signer process ever builds one."""

    name: str
    private_key: Ed25519PrivateKey

    @property
    def verifier(self) -> AuditVerifier:
        return AuditVerifier(self.name, self.private_key.public_key())

    @property
    def skey(self) -> str:
        seed = self.private_key.private_bytes_raw()
        return (
            f"{SKEY_PREFIX}{self.name}+{self.verifier.key_hash.hex()}+"
            + base64.b64encode(bytes([ALG_ED25519]) + seed).decode()
        )

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def note_signer(self) -> note.Signer:
        """This key as an ``intake_verify.note.Signer`` (for signed notes)."""
        return note.Signer.from_skey(self.skey)

    def __repr__(self) -> str:  # never print the key
        return f"AuditSigner(name={self.name!r}, key_id={self.verifier.key_id!r})"


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def parse_skey(text: str, default_name: str) -> AuditSigner:
    """Read a private key: C2SP ``PRIVATE+KEY+name+hex8+base64`` or raw base64 (old format)."""
    text = text.strip()
    if text.startswith(SKEY_PREFIX):
        try:
            signer = note.Signer.from_skey(text)
        except note.NoteError as error:
            raise AuditKeyError(f"{BAD_SKEY} ({error})") from None
        if signer.alg != ALG_ED25519:
            raise AuditKeyError(BAD_SKEY + " (not an Ed25519 log key)")
        return AuditSigner(signer.name, signer.private_key)
    try:
        raw = _b64(text)
    except (ValueError, binascii.Error):
        raise AuditKeyError(BAD_SKEY) from None
    if len(raw) != 32:
        raise AuditKeyError(BAD_SKEY)
    return AuditSigner(default_name, Ed25519PrivateKey.from_private_bytes(raw))


def parse_vkey(text: str, default_name: str) -> AuditVerifier:
    """Read a public key: C2SP ``name+hex8+base64`` or raw base64 (old format)."""
    text = text.strip()
    if text.startswith(SKEY_PREFIX):
        raise AuditKeyError("a private key was given where only public keys belong: " + BAD_VKEY)
    if "+" in text and len(text.split("+", 2)) == 3 and len(text.split("+", 2)[1]) == 8:
        try:
            verifier = note.Verifier.from_vkey(text)
        except note.NoteError as error:
            raise AuditKeyError(f"{BAD_VKEY} ({error})") from None
        if verifier.alg != ALG_ED25519:
            raise AuditKeyError(BAD_VKEY + f" ({verifier.name} is not an Ed25519 log key)")
        return AuditVerifier(verifier.name, verifier.public_key)
    try:
        raw = _b64(text)
    except (ValueError, binascii.Error):
        raise AuditKeyError(BAD_VKEY) from None
    if len(raw) != 32:
        raise AuditKeyError(BAD_VKEY)
    return AuditVerifier(default_name, Ed25519PublicKey.from_public_bytes(raw))


def _split_keys(text: str) -> list[str]:
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return [part for line in lines for part in line.replace(",", " ").split() if part]


def generate_keys(name: str) -> tuple[str, str]:
    """A new key pair for the log ``name``: (private key for the signer, public key for all)."""
    try:
        return note.generate_key(name)
    except note.NoteError as error:
        raise AuditKeyError(f"cannot make a key named {name!r}: {error}") from None


def signer_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / SIGNER_DIR


def public_keys_path(settings: Settings) -> Path:
    """Where the embedded signer publishes its public keys: next to the checkpoints file."""
    checkpoints = settings.audit_checkpoints or Path(settings.data_dir) / DEFAULT_CHECKPOINTS_FILE
    return Path(checkpoints).parent / PUBLIC_KEYS_FILE


def _private_folder(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_new(path: Path, text: str, mode: int) -> bool:
    """Create ``path`` holding ``text`` (mode ``mode``); False if it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _embedded_signer(settings: Settings) -> AuditSigner:
    """The embedded signer's key: made on first use in ``<data dir>/signer/`` (0700, file 0600).

    An older key (``<data dir>/audit-signing-key``, readable by every process)
    moves into the signer's folder, so its old checkpoints keep verifying and nothing else can
    read it any more.
    """
    folder = signer_dir(settings)
    _private_folder(folder)
    path = folder / SIGNER_KEY_FILE
    legacy = Path(settings.data_dir) / LEGACY_KEY_FILE
    if not path.exists():
        if legacy.is_file():
            signer = parse_skey(legacy.read_text(encoding="utf-8"), log_origin(settings))
            moved = "moved from " + str(legacy)
        else:
            signer = AuditSigner(log_origin(settings), Ed25519PrivateKey.generate())
            moved = "generated"
        if _write_new(path, signer.skey + "\n", 0o600):
            log.warning(
                "secret_generated",
                secret="audit signing key",  # noqa: S106 - names the secret
                path=str(path),
                mode="0600",
                how=moved,
                advice="only the signer reads this folder; production sets "
                "INTAKE_AUDIT_SIGNING_KEY in the signer's env file",
            )
    signer = parse_skey(path.read_text(encoding="utf-8"), log_origin(settings))
    if legacy.is_file():
        old = parse_skey(legacy.read_text(encoding="utf-8"), signer.name)
        if old.verifier.raw == signer.verifier.raw:
            legacy.unlink()  # moved: web and workers must not find it any more
    return signer


def load_signer(settings: Settings) -> AuditSigner:
    """The checkpoint signing key, for the signer process only.

    ``INTAKE_AUDIT_SIGNING_KEY`` (the key or a file holding it); else, embedded, the generated
    key in the signer's folder. The embedded signer also publishes its public key
    (:func:`publish_public_key`) so that verification needs nothing private.
    """
    if settings.audit_signing_key:
        signer = parse_skey(read_secret_setting(settings.audit_signing_key), log_origin(settings))
    elif settings.embedded:
        signer = _embedded_signer(settings)
    else:
        raise AuditKeyError(
            "no signing key: set INTAKE_AUDIT_SIGNING_KEY in the signer's env file "
            "(`intake audit keys generate` makes one)"
        )
    if not settings.audit_verify_keys:
        publish_public_key(settings, signer.verifier)
    return signer


def publish_public_key(settings: Settings, verifier: AuditVerifier) -> None:
    """Add ``verifier`` to the public keys file next to the checkpoints (kept after rotation)."""
    path = public_keys_path(settings)
    try:
        known = {v.raw for v in _read_verifiers(path.read_text(encoding="utf-8"), verifier.name)}
    except FileNotFoundError:
        known = set()
    if verifier.raw in known:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (verifier.vkey + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("audit_public_key_published", path=str(path), key_id=verifier.key_id)


def _read_verifiers(text: str, default_name: str) -> list[AuditVerifier]:
    return [parse_vkey(part, default_name) for part in _split_keys(text)]


def load_verifiers(settings: Settings) -> list[AuditVerifier]:
    """Every public key checkpoints may be signed with, old ones included (none if unknown).

    ``INTAKE_AUDIT_VERIFY_KEYS`` (keys, or the path of a file of them); else the public keys
    file the signer writes next to the checkpoints.
    """
    name = log_origin(settings)
    if settings.audit_verify_keys:
        return _read_verifiers(read_secret_setting(settings.audit_verify_keys), name)
    try:
        return _read_verifiers(public_keys_path(settings).read_text(encoding="utf-8"), name)
    except FileNotFoundError:
        return []


def verifiers_by_id(verifiers: Iterable[AuditVerifier]) -> dict[str, Ed25519PublicKey]:
    """Public keys by the key id written on checkpoints."""
    return {v.key_id: v.public_key for v in verifiers}


SIGNING_KEY_REFUSED = (
    "INTAKE_AUDIT_SIGNING_KEY is set, but only the signer (`intake audit signer`) may hold the "
    "audit signing key: remove it from the environment of web, worker and beat (they need only "
    "INTAKE_AUDIT_VERIFY_KEYS) and put it in the signer's own env file"
)


def refuse_signing_key(settings: Settings) -> None:
    """Stop a production web or worker process that was given the private key.

    Why: whoever holds the key can sign a rewritten history. Web and workers face patients,
    staff and the network; if one is taken over, the checkpoints must still be out of reach.
    """
    from config.settings import SettingsError

    if settings.profile == "production" and settings.audit_signing_key:
        raise SettingsError(SIGNING_KEY_REFUSED)
