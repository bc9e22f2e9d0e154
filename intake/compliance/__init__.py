"""The compliance officer's side: the audit trail, access reports, verification.

Views, forms and templates, plus the queries behind the officer's pages (``reports``,
``dashboard``, ``charts``) and the review of break-glass accesses (``break_glass``); the trail
itself and its verification are ``intake.audit``. It never imports the patient or staff wing.
"""
