"""Structured logging: JSON lines to stderr and to the data folder, never PHI.

Log events carry ids, references, counts and reasons. Nothing logs a form, a request body or
a decrypted document; the canary tests read every line written to prove it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog

# Celery says "received" and "succeeded" for every task and beat "Sending due task" for every
# tick: the outbox sweep alone made three lines every 5 s, burying what matters. What a task
# did is logged by Intake itself (request_routed, notification_sent, ...) and failures and
# retries keep their own lines; these three show again at level DEBUG.
_TASK_CHATTER = {
    "celery.worker.strategy": ("Task %(name)s[%(id)s] received",),
    "celery.app.trace": ("Task %(name)s[%(id)s] succeeded",),
    "celery.beat": ("Scheduler: Sending due task",),
    "celery.worker.request": ("Discarding revoked task",),
    "celery.worker.control": ("Tasks flagged as revoked",),
}


def is_task_chatter(record: logging.LogRecord) -> bool:
    """A Celery line saying a task arrived, finished or was sent, at INFO."""
    prefixes = _TASK_CHATTER.get(record.name)
    if prefixes is None or record.levelno != logging.INFO:
        return False
    return str(record.msg).startswith(prefixes)


def _no_backend_to_mark(record: logging.LogRecord) -> bool:
    """Celery's revoke tries to record each task's state in a result backend, and Intake runs
    none (tasks return nothing): one warning per task, every time, that says only that."""
    return not str(record.msg).startswith("Failed to mark task")


def configure_logging(level: str = "INFO", log_dir: Path | None = None) -> None:
    """Send structlog and stdlib logging through one JSON formatter."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    console = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    root = logging.getLogger()
    root.setLevel(level)
    verbose = root.getEffectiveLevel() <= logging.DEBUG
    # Quiet chatter that tells an operator nothing.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("kombu.connection").addFilter(_supplied_hostname)  # kept once, however often
    logging.getLogger("celery.worker.control").addFilter(_no_backend_to_mark)
    if not any(_ours(h) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(console if sys.stderr.isatty() else formatter)
        stream._intake = True  # type: ignore[attr-defined]
        if not verbose:
            stream.addFilter(lambda record: not is_task_chatter(record))
        root.addHandler(stream)
    if log_dir is not None:
        path = (log_dir / "intake.log").resolve()
        # One log file per process: an app made for another data folder (a command, a test)
        # moves it there and closes the one before, rather than keeping every file open and
        # writing each line to all of them.
        current = [h for h in root.handlers if isinstance(h, logging.FileHandler) and _ours(h)]
        if [Path(h.baseFilename) for h in current] != [path]:
            for handler in current:
                root.removeHandler(handler)
                handler.close()
            log_dir.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(path, encoding="utf-8")
            file_handler.setFormatter(formatter)
            file_handler._intake = True  # type: ignore[attr-defined]
            if not verbose:
                file_handler.addFilter(lambda record: not is_task_chatter(record))
            root.addHandler(file_handler)


def _supplied_hostname(record: logging.LogRecord) -> bool:
    return "No hostname was supplied" not in record.getMessage()


def _ours(handler: logging.Handler) -> bool:
    return bool(getattr(handler, "_intake", False))
