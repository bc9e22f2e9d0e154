"""The pharmacy staff's side: login with TOTP, the queue, request pages, actions, search.

Views, forms and templates only: the actions themselves are ``intake.requests.casework``, the
accounts and login guards ``intake.accounts``. It never imports the patient or compliance wing.
"""
