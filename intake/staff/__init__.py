"""The pharmacy staff's side: login with TOTP, the queue, request pages, actions, search."""
