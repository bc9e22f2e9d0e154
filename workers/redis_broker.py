"""The production broker: kombu's Redis transport, where a closed connection fails as one.

Why: with kombu 5.7 a worker that loses Redis while it holds unacknowledged tasks (running with
``acks_late``, or prefetched) stopped with "Unrecoverable error: AttributeError("'NoneType'
object has no attribute 'hostname'")" instead of reconnecting. On a lost connection Celery's
consumer (``on_connection_error_after_connected``) first ``collect()``s the connection and then
``close()``s it. For Redis, ``collect()`` closes the channel and then detaches the transport
(``transport.client = None``); but the channel's ``close()`` had stopped at its first step, reading
the reply to the BRPOP in flight, which raises ConnectionError when Redis is gone. The second
close therefore goes on to put the unacknowledged messages back, and so does a late ``ack`` of a
task that finishes afterwards: both build a new connection pool from ``transport.client``, read
``None.hostname``, and raise AttributeError. Celery retries connection errors only, so the whole
worker exited and needed a restart.

Here a channel whose transport has been detached raises redis's ConnectionError instead, which
is what happened: kombu and Celery treat it as a lost connection (the close finishes, a late ack
is logged as "Couldn't ack"), and the consumer reconnects. The messages are not lost: Redis
keeps them under its ``unacked`` key and hands them out again after the visibility timeout, and
if Redis came back empty the outbox sweep publishes again whatever is not done. Routing and
notifying are idempotent, so a redelivered task changes nothing.

Upstream: no kombu issue names this path yet (kombu 5.7.0 is the newest release); celery/kombu
#970 is the same failure in an older ``restore_unacked``. Drop this module once kombu's Redis
channel stops reading ``self.connection.client`` after its connection was collected.

Registered under kombu's own ``redis`` and ``rediss`` names (workers.celery_app does so on import,
before any connection is made), so broker URLs, log lines and Flower's broker page stay as they
are; only processes that load ``workers`` use it.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES, redis
from redis.exceptions import ConnectionError as RedisConnectionError

SCHEMES = ("redis", "rediss")


class Channel(redis.Channel):  # type: ignore[misc]
    def _connparams(self, asynchronous: bool = False) -> Any:
        """Connection parameters, or ConnectionError once the connection has been closed."""
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection of this channel was closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(redis.Transport):  # type: ignore[misc]
    Channel = Channel


def register() -> None:
    """Serve ``redis://`` and ``rediss://`` with this transport (idempotent)."""
    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
