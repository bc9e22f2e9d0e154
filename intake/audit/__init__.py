"""The tamper-evident audit trail: who did what, and proof that nobody changed it.

``chain`` appends events to the hash chain in the caller's transaction and verifies the chain;
``anchor`` sends every event's (seq, hash) to an append-only sink outside the database before
its transaction commits and compares the chain with it; ``checkpoints`` signs the chain's head
with Ed25519 into a file outside the database and holds the chain against those signatures;
``keys`` loads the signer's private key and everyone else's public keys; ``signer`` is the loop
of the one process that signs; ``verify`` runs the whole check for a compliance officer and
records ``audit.verified``; ``anomalies`` is the rule that flags unusual access; ``commands`` is
the ``intake audit`` CLI group (verify, checkpoint, signer, keys generate).
"""
