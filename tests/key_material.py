"""The forms a signing key's secret can take in a file, a process's environment or a backup:
what a test that proves the key is absent must look for."""

from __future__ import annotations

import base64

from intake.audit import keys


def signing_key_forms(skey: str) -> list[bytes]:
    """``skey`` as written, its base64 of type || seed, and the 32-byte seed raw, in base64
    and in hex."""
    seed = keys.parse_skey(skey, "unused").private_key.private_bytes_raw()
    return [
        skey.encode(),
        # everything after PRIVATE+KEY+name+hash: split from the left, as base64 holds "+"
        skey.split("+", 4)[4].encode(),
        base64.b64encode(seed),
        seed.hex().encode(),
        seed,
    ]
