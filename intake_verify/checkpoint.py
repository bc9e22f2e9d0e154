"""C2SP checkpoints (c2sp.org/tlog-checkpoint): the note text a log signs for each tree head.

``origin\\nsize\\nbase64(root)\\n`` and optional extension lines. Intake adds one extension,
``time <YYYY-MM-DDTHH:MM:SSZ>``, so that a reader can tell a stale checkpoint from a fresh one;
it is signed with the rest (witnesses make no statement about it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from intake_verify.encoding import b64decode, b64encode
from intake_verify.merkle import HASH_SIZE

_SIZE = re.compile(r"0|[1-9][0-9]*")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class CheckpointError(ValueError):
    """The text is not a well-formed checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: which log (origin), how many leaves, and the root hash."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        """The note text: one field per line, each ending in a newline."""
        lines = [self.origin, str(self.size), b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Read a checkpoint body; raise CheckpointError unless it is exactly well-formed."""
        if not text.endswith("\n"):
            raise CheckpointError("a checkpoint must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError("a checkpoint has at least three lines")
        origin, size, root, *extensions = lines
        if not origin or not all(extensions):
            raise CheckpointError("a checkpoint has no empty lines")
        if not _SIZE.fullmatch(size):
            raise CheckpointError("the tree size is not a decimal number")
        try:
            root_hash = b64decode(root)
        except ValueError as exc:
            raise CheckpointError(f"the root hash is {exc}") from exc
        if len(root_hash) != HASH_SIZE:
            raise CheckpointError("the root hash is not a SHA-256 hash")
        return cls(origin, int(size), root_hash, tuple(extensions))

    @property
    def time(self) -> datetime | None:
        """When the log signed it, from the ``time`` extension line (None if absent)."""
        for line in self.extensions:
            if line.startswith("time "):
                try:
                    return datetime.strptime(line[5:], _TIME_FORMAT).replace(tzinfo=UTC)
                except ValueError as exc:
                    raise CheckpointError("the time extension is not a UTC time") from exc
        return None


def time_extension(moment: datetime) -> str:
    """The ``time`` extension line for ``moment`` (whole seconds, UTC)."""
    return "time " + moment.astimezone(UTC).strftime(_TIME_FORMAT)
