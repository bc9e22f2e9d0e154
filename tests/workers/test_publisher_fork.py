"""A process forked from one whose publisher was busy can still publish and revoke.

The revoke sender thread holds the publisher's lock for a moment each turn. A fork in that
moment (gunicorn, a Celery pool, a management command) copies the lock held, and nothing in
the child would ever let it go: the child's first failed publish or revoke would hang, and
with it the patient's submission or the routing task.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from celery import Celery

from workers.publish import CeleryPublisher


def test_a_child_forked_while_another_thread_holds_the_lock_publishes_and_revokes(redis_server):
    publisher = CeleryPublisher(Celery(broker=redis_server.url))
    assert publisher.revokes
    holding, done = threading.Event(), threading.Event()

    def sender() -> None:  # what the revoke sender does, caught at the wrong moment
        with publisher._lock:
            holding.set()
            done.wait(10)

    thread = threading.Thread(target=sender)
    thread.start()
    holding.wait(5)
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - its outcome is its exit status
            try:
                publisher._broke()  # a failed publish starts the cool-off: takes the lock
                publisher._broken_until = 0.0
                taken = publisher.revoke(["route_request-1-fork-test"])
                publisher.close()
                os._exit(0 if taken else 2)
            except BaseException:
                os._exit(1)
    finally:
        done.set()
        thread.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            assert os.waitstatus_to_exitcode(status) == 0, "the child's revoke was not taken"
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    raise AssertionError("the child hung on the publisher's lock, inherited held")
