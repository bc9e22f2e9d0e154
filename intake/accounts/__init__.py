"""Staff accounts and how staff prove who they are.

``services`` creates and changes users and teams, hashes and checks passwords (argon2id,
common-password list), checks TOTP codes, keeps the server-side sessions and the login
throttle; ``login`` connects them to Flask-Login (the logged-in principal and its audit actor)
and holds the guards the staff and compliance wings put on their views (``roles_required``,
``safe_next``, the cross-site navigation check).
"""
