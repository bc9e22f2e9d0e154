"""The patient's side: refill and contact forms, thanks and status pages.

Views, forms and templates, plus what belongs to a form on its way through the patient's
browser: ``form_stamp`` (the signed first-render time and one-time submission key a form
carries across re-renders) and ``receipts`` (the thanks page's summary, kept in the patient's
own signed session, never looked up by reference). What a request becomes once sent is
``intake.requests``'s business. Like the other wings, it never imports the staff or compliance
wing.
"""
