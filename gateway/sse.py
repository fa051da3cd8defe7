"""Server-sent events: the value type, an incremental parser and the encoder.

Owns the SSE wire format (WHATWG event stream). Must not know about OpenAI payloads beyond
the `[DONE]` sentinel, and must not do I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

DONE = "[DONE]"


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event: `data` is the joined data lines, `event` the optional event name.

    `raw` is set by the parser when the received bytes are exactly what `encode` would
    write, so an event passed on unchanged is written without encoding it again."""

    data: str
    event: str | None = None
    raw: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def is_done(self) -> bool:
        return self.data == DONE

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        head = f"event: {self.event}\n" if self.event else ""
        if "\n" not in self.data:  # the usual case: one data line
            return f"{head}data: {self.data}\n\n".encode()
        body = "".join(f"data: {line}\n" for line in self.data.split("\n"))
        return (head + body + "\n").encode()


class SseParser:
    """Turns arbitrary byte chunks into complete events, keeping partial lines across feeds."""

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> Iterator[SseEvent]:
        if not self._buffer and not self._data and self._event is None:
            simple = _simple_event(chunk)
            if simple is not None:  # the usual chunk: exactly one whole `data:` event
                yield simple
                return
        self._buffer += chunk
        while True:
            event = self._take_simple_event()
            if event is not None:
                yield event
                continue
            cut = _line_end(self._buffer)
            if cut is None:
                return
            end, skip = cut
            line = self._buffer[:end].decode("utf-8", errors="replace")
            self._buffer = self._buffer[end + skip :]
            event = self._take_line(line)
            if event is not None:
                yield event

    def flush(self) -> Iterator[SseEvent]:
        """Ends the stream: a final event without its blank line still counts."""
        if self._buffer:
            event = self._take_line(self._buffer.decode("utf-8", errors="replace"))
            self._buffer = b""
            if event is not None:
                yield event
        event = self._take_line("")
        if event is not None:
            yield event

    def _take_simple_event(self) -> SseEvent | None:
        """The usual event, one `data: ...` line and a blank line, taken whole when it
        starts the buffer between events; its bytes are kept as `raw`."""
        buffer = self._buffer
        if self._data or self._event is not None or not buffer.startswith(b"data: "):
            return None
        end = buffer.find(b"\n\n")
        if end == -1 or buffer.find(b"\n", 0, end) != -1 or buffer.find(b"\r", 0, end) != -1:
            return None
        try:
            data = buffer[6:end].decode()
        except UnicodeDecodeError:
            return None
        self._buffer = buffer[end + 2 :]
        return SseEvent(data, None, buffer[: end + 2])

    def _take_line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        return None

    def _dispatch(self) -> SseEvent | None:
        if not self._data:
            self._event = None
            return None
        event = SseEvent("\n".join(self._data), self._event)
        self._data = []
        self._event = None
        return event


class WholeEvents:
    """Cuts a byte stream after complete events only, leaving the bytes as they are.

    For passing a stream on untouched: each piece ends with an event's blank line (`\\n\\n`,
    `\\r\\n\\r\\n` or `\\r\\r`), so a reader of the pieces so far is never inside an event,
    and an error event can follow any piece. At the end, a last event without its blank
    line gets one, as `SseParser.flush` counts it.
    """

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> tuple[bytes, ...]:
        data = self._rest + chunk if self._rest else chunk
        if data.endswith(b"\n\n"):  # the usual chunk: whole events
            self._rest = b""
            return (data,)
        cut = max(_end_of(data, b"\n\n"), _end_of(data, b"\r\n\r\n"), _end_of(data, b"\r\r"))
        if not cut:
            self._rest = data
            return ()
        self._rest = data[cut:]
        return (data[:cut],)

    def flush(self) -> tuple[bytes, ...]:
        rest, self._rest = self._rest, b""
        return (rest + b"\n\n",) if rest.strip() else ()


def _end_of(data: bytes, blank: bytes) -> int:
    """Where the last `blank` in `data` ends, or 0."""
    found = data.rfind(blank)
    return found + len(blank) if found != -1 else 0


def _simple_event(chunk: bytes) -> SseEvent | None:
    """The chunk as one event when it is exactly one `data: ...` line and a blank line."""
    end = len(chunk) - 2
    if (
        not chunk.startswith(b"data: ")
        or chunk.find(b"\n") != end
        or not chunk.endswith(b"\n\n")
        or b"\r" in chunk
    ):
        return None
    try:
        return SseEvent(chunk[6:end].decode(), None, chunk)
    except UnicodeDecodeError:
        return None


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Index and length of the first line terminator (CRLF, LF or CR), if complete."""
    lf = buffer.find(b"\n")
    cr = buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, 1)
    if cr == len(buffer) - 1:
        return None  # a CR at the end may be the first half of CRLF
    return (cr, 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, 1)
