"""PHI at rest: envelope encryption, blind indexes and the keys behind them.

``phi`` holds the keyring of versioned key-encryption keys, seals and opens a request's PHI
under a per-request data key bound to its row and purpose (AES-256-GCM), and computes the blind
indexes (HMAC) that exact-match search and client-address pseudonyms use; ``rotation`` reports
which key protects how many rows, records a rotation and rewraps data keys under the new
primary key.
"""
