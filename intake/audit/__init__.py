"""The tamper-evident audit trail: who did what, and proof that nobody changed it.

``chain`` appends events to the hash chain in the caller's transaction and verifies the chain;
``checkpoints`` signs the chain's head with Ed25519 into a file outside the database and holds
the chain against those signatures; ``verify`` runs the whole check for a compliance officer and
records ``audit.verified``; ``anomalies`` is the rule that flags unusual access; ``commands`` is
the ``intake audit`` CLI group (verify, checkpoint).
"""
