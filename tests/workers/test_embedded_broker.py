"""The embedded broker: a consumer never reads a message half written, nor dies on a bad file.

kombu's own filesystem transport creates a message file under the name consumers look for and
only then writes it; a consumer polling at the same moment read an empty or partial file and the
worker stopped with "Unrecoverable error: JSONDecodeError". These run the transport as the
worker does, a producer and a consumer on one folder at the same time.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from queue import Empty

import pytest
from flask import Flask
from kombu import Connection
from structlog.testing import capture_logs

from config import Settings
from workers import embedded_broker
from workers.celery_app import broker_settings

embedded_broker.register()


def _connection(folder: Path, transport: str = "intakefs") -> Connection:
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return Connection(
        f"{transport}://",
        transport_options={
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.001,
        },
    )


def _race(folder: Path, transport: str, count: int = 200) -> tuple[int, list[BaseException]]:
    """Publish ``count`` large messages while a consumer polls; return (received, errors)."""
    payload = "x" * 2_000_000  # big enough that writing a file takes a while
    # A queue name of its own: kombu keeps declared exchanges per process, not per folder.
    name = "race" + uuid.uuid4().hex[:8]
    errors: list[BaseException] = []
    received = 0
    done = threading.Event()

    def produce() -> None:
        with _connection(folder, transport) as conn:
            queue = conn.SimpleQueue(name)
            for n in range(count):
                queue.put({"n": n, "body": payload})
            queue.close()
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    with _connection(folder, transport) as conn:
        queue = conn.SimpleQueue(name)
        while received < count:
            try:
                message = queue.get(timeout=0.001)
            except Empty:
                if done.is_set() and not any((folder / "queue").glob(f"*.{name}.msg")):
                    break
                continue
            except Exception as error:  # noqa: BLE001 - what a worker would die of
                errors.append(error)
                if len(errors) > 3:
                    break
                continue
            assert len(message.payload["body"]) == len(payload)
            message.ack()
            received += 1
        queue.close()
    producer.join(60)
    return received, errors


def test_a_consumer_polling_while_messages_are_written_gets_each_one_whole(tmp_path):
    received, errors = _race(tmp_path, "intakefs")
    assert errors == []
    assert received == 200
    # Nothing left behind: no message, no partial file.
    assert list((tmp_path / "queue").iterdir()) == []


def test_a_damaged_message_file_is_skipped_and_the_next_one_delivered(tmp_path):
    with capture_logs() as logs, _connection(tmp_path) as conn:
        queue = conn.SimpleQueue("tasks" + uuid.uuid4().hex[:8])
        # A file under a consumer's name that is not a message (a disk fault, or a file left
        # half written by kombu's own writer before this transport).
        (tmp_path / "queue" / f"1_broken.{queue.queue.name}.msg").write_bytes(b"")
        queue.put({"after": "the broken one"})
        message = queue.get(timeout=5)
        assert message.payload == {"after": "the broken one"}
        message.ack()
        with pytest.raises(Empty):
            queue.get(timeout=0.2)
        queue.close()
    assert [e["event"] for e in logs] == ["embedded_broker_message_unreadable"]


def test_the_embedded_profile_uses_the_whole_file_transport(tmp_path):
    # No Redis URL: the folder broker in the data folder, through this transport.
    flask_app = Flask("embedded")
    flask_app.extensions["intake.settings"] = Settings(data_dir=tmp_path)
    settings = broker_settings(flask_app)
    assert settings["broker_url"] == "intakefs://"
    with Connection(settings["broker_url"]) as conn:
        assert isinstance(conn.transport, embedded_broker.Transport)
