"""Request reference numbers: random, unambiguous, easy to read over the phone."""

from __future__ import annotations

import re
import secrets

# Crockford's base32: no I, L, O or U, so nothing is mistaken for 1, 0 or a rude word.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
PREFIXES = {"refill": "R", "contact": "C"}
GROUPS, GROUP_LENGTH = 2, 4  # 8 symbols x 5 bits = 40 random bits

REFERENCE_RE = re.compile(rf"^[RC]-[{ALPHABET}]{{{GROUP_LENGTH}}}-[{ALPHABET}]{{{GROUP_LENGTH}}}$")
_CONFUSABLE = str.maketrans({"I": "1", "L": "1", "O": "0", "U": "V"})


def new_reference(kind: str) -> str:
    groups = ("".join(secrets.choice(ALPHABET) for _ in range(GROUP_LENGTH)) for _ in range(GROUPS))
    return "-".join((PREFIXES[kind], *groups))


def normalize_reference(text: str) -> str | None:
    """Read a reference as a patient might type it ('r 7k3m q9p2', 'R-7K3M-Q9PZ')."""
    compact = re.sub(r"[\s\-]", "", text or "").upper()
    if len(compact) != 1 + GROUPS * GROUP_LENGTH or compact[0] not in "RC":
        return None
    body = compact[1:].translate(_CONFUSABLE)
    candidate = f"{compact[0]}-{body[:GROUP_LENGTH]}-{body[GROUP_LENGTH:]}"
    return candidate if REFERENCE_RE.match(candidate) else None
