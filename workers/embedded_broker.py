"""The embedded profile's broker: kombu's filesystem transport, with messages written whole.

Why: kombu's ``filesystem://`` creates each message file under its final name and only then
writes it, so a worker polling the folder can take a file that is still empty or half written;
``json.loads`` then fails inside the consumer and the whole worker stops ("Unrecoverable error:
JSONDecodeError"). Here a message is written under a name the consumer does not take
(``.partial``), flushed, and renamed into place: a rename within one folder is atomic, so a
consumer sees either no file or the whole message.

A file that still cannot be read (a disk fault, a hand-edited folder, a file left by an older
version) is logged and skipped; the worker goes on. Nothing is lost for good either way: the
outbox publishes again whatever was not done after ``INTAKE_OUTBOX_REPUBLISH_SECONDS``.

Registered as the ``intakefs://`` transport; workers.celery_app uses it when no Redis is set.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

import structlog
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps

log = structlog.get_logger(__name__)

ALIAS = "intakefs"
PARTIAL = ".partial"


class Channel(filesystem.Channel):  # type: ignore[misc]
    # kombu's filesystem Channel and its abstract base disagree on this signature: keep the
    # filesystem one, which is what kombu calls.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Write ``payload`` to ``queue`` as one file that appears complete or not at all."""
        # The name kombu's consumer looks for: "<ms>_<uuid>.<queue>.msg", oldest first.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + PARTIAL  # "<queue>.msg.partial" is not a queue the consumer reads
        try:
            with open(partial, "wb") as handle:
                handle.write(dumps(payload).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, final)
        except OSError as exc:
            Path(partial).unlink(missing_ok=True)
            raise ChannelError(f"cannot add a message to {self.data_folder_out!r}") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)
        except ValueError as exc:  # json.JSONDecodeError: the file was damaged on disk
            log.error("embedded_broker_message_unreadable", queue=queue, error=type(exc).__name__)
            raise Empty() from exc


class Transport(filesystem.Transport):  # type: ignore[misc]
    Channel = Channel
    driver_type = ALIAS
    driver_name = ALIAS


def register() -> None:
    """Make ``intakefs://`` a kombu transport (idempotent)."""
    TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")
