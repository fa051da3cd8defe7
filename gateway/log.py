"""Structured logging: configures structlog once for JSON lines with request context.

Owns the processor chain (contextvars, level, timestamp, exceptions, renderer) and knowing
whether debug events are written. Must not decide what is logged; callers log snake_case
events with key-value fields, never prompt text, keys or tokens.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class _Stream:
    """Where log lines go. Loggers are cached on first use, so reconfiguring swaps the target
    here rather than in each cached logger (tests capture logs per test this way)."""

    target: TextIO | None = None

    def write(self, text: str) -> int:
        return (self.target or sys.stdout).write(text)

    def flush(self) -> None:
        (self.target or sys.stdout).flush()


_STREAM = _Stream()
_debug_enabled = True  # structlog writes every level until it is configured


def write_lines(text: str) -> None:
    """Writes lines rendered elsewhere (the audit trail's) to the log stream as one write, the
    way a configured logger writes its own (with its newline, flush and lock)."""
    _lines().msg(text)


@functools.cache
def _lines() -> structlog.WriteLogger:
    # One for the process: making one per call cost more than writing (~9k instructions).
    return structlog.WriteLogger(_STREAM)  # type: ignore[arg-type]


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Sets up structlog for the process; call once at startup."""
    global _debug_enabled
    _debug_enabled = _LEVELS[level] <= logging.DEBUG
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )  # fmt: skip
    _STREAM.target = stream
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (print() makes two when Python runs unbuffered).
        logger_factory=structlog.WriteLoggerFactory(_STREAM),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _route_library_logs()


def debug_enabled() -> bool:
    """Whether debug events are written. A hot path asks before logging one: a dropped event
    still costs binding the lazy logger and building its fields (~2 us)."""
    return _debug_enabled


class _LibraryRecords(logging.Handler):
    """Records of libraries that log through the standard library (aiohttp, asyncio) become
    one JSON event naming the logger, level and exception type, never their text: aiohttp's
    server logger quotes the first bytes of a malformed request line or header, which can be a
    credential, and a traceback is no log line for a SIEM."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        get_logger(record.name).log(
            record.levelno, "library_log_record", source=record.name, error_type=kind
        )


def _route_library_logs() -> None:
    root = logging.getLogger()
    if not any(isinstance(handler, _LibraryRecords) for handler in root.handlers):
        root.addHandler(_LibraryRecords())
    root.setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    """A lazily configured logger bound to `logger_name=name`."""
    return structlog.get_logger(logger_name=name)
