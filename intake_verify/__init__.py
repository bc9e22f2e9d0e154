"""The standalone verifier of Intake's audit log: proofs anyone can check offline.

An outside auditor, a patient or a witness checks with this package, and only the log's public
key, that an event is in the audit log (an inclusion proof against a signed checkpoint) and that
the log only ever grew (a consistency proof between two checkpoints). It implements the public
formats it relies on (RFC 9162 Merkle trees, C2SP signed notes, checkpoints, cosignatures and the
witness protocol) with the standard library and ``cryptography`` alone, and never imports the
application, so it can be copied into another code base and read in an afternoon.
"""
