"""The patient's side: refill and contact forms, thanks and status pages.

Views, forms and templates only: what a request becomes once sent is ``intake.requests``'s
business. Like the other wings, it never imports the staff or compliance wing.
"""
