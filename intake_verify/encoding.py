"""Base64 that has exactly one spelling for each value.

Python's decoder accepts a string whose unused low bits in the last character are not zero, so
several strings decode to the same hash or signature. A proof file must fail after any one-bit
change, so the verifier accepts only the canonical encoding: the one that encoding the decoded
bytes gives back.
"""

from __future__ import annotations

import base64
import binascii


def b64encode(data: bytes) -> str:
    """Standard base64 (RFC 4648 section 4), padded."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """Decode standard base64, refusing anything but the canonical spelling (ValueError)."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError("not base64") from exc
    if b64encode(data) != text:
        raise ValueError("not canonical base64")
    return data
