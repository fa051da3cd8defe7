"""An audit sink that keeps every line in memory, for tests of the audit writer and trail."""

from __future__ import annotations


class ListSink:
    name = "list"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
