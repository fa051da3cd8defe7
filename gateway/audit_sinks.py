"""Where audit lines go: the process's log stream or a size-rotated file.

Owns the `Sink` contract (write may hold lines until flush; close flushes) and the two
built-in sinks. Must not build, number or scrub events (the writer in `gateway.audit` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gateway.log import write_lines


class Sink(Protocol):
    """Where events go: `write` takes one line (no newline) and may hold it until `flush`;
    `close` flushes. Errors are `OSError`."""

    name: str

    def write(self, line: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    """The process's log stream (stdout unless reconfigured), one line per event, the lines
    held until `flush` write in one call."""

    name = "stdout"

    def __init__(self) -> None:
        self._pending: list[str] = []

    def write(self, line: str) -> None:
        self._pending.append(line)

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        write_lines("\n".join(lines))

    def close(self) -> None:
        """Flushes; the stream itself belongs to the logging configuration."""
        self.flush()


class RotatingFileSink:
    """Appends lines to `path`; past `max_bytes` it shifts path.1 .. path.N and starts afresh."""

    name = "file"

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._size = self._file.tell()  # including the lines held in `_pending`
        self._pending: list[str] = []

    def write(self, line: str) -> None:
        size = (len(line) if line.isascii() else len(line.encode())) + 1
        if self._size and self._size + size > self.max_bytes:
            self.flush()
            self._rotate()
        self._pending.append(line)
        self._size += size

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("a", encoding="utf-8")
        self._size = 0

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._file.close()
