"""The life of a patient's request, from the form to its purge.

``submit`` seals a validated form and stores it with its consents (``consents``, the versioned
texts), a reference (``references``), the ``request.submitted`` event and an ``outbox`` row in
one transaction; the outbox publishes the routing task after commit. ``routing`` reads the rules
of ``config/routing.toml`` and routes a request to a team (``locations`` gives the forms the
routing file's locations); ``notifications`` tells the team. ``casework`` is everything staff
do to a request (claim, open, status, notes, transfer, escalation, the queue and search);
``timeline`` tells a request's audit events as the staff page's timeline, and ``labels`` turns
its coded values, times and phone into words for people;
``status_lookup`` answers a patient's status check; ``retention`` crypto-shreds closed requests.
"""
