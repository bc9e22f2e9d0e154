"""The compliance officer's side: the audit trail, access reports, verification."""
