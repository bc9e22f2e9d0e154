"""The tests' SMTP server cleans up after itself, so its leftovers never fail another test."""

from __future__ import annotations

import gc
import socket
import warnings

from tests.workers.conftest import Mailbox, running_smtp


def test_a_connection_still_open_when_the_server_stops_is_reclaimed_with_it():
    """Before: a connection accepted just before ``Controller.stop()`` (a worker sending as its
    test ended) kept an unclosed transport that the garbage collector found later, in another
    test; under ``filterwarnings = error`` that test failed, once with a SystemError from
    ``ast.parse`` on Python 3.11."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with running_smtp(Mailbox()) as controller:
            # Several, so that one at least is accepted and not yet served when it stops.
            clients = [socket.create_connection(("127.0.0.1", controller.port)) for _ in range(5)]
        del controller
        gc.collect()
    for client in clients:
        client.close()
    leftovers = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leftovers == []
