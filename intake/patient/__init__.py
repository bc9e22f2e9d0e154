"""The patient's side: refill and contact forms, thanks and status pages."""
