"""`gateway serve`, `gateway config check`, `gateway version` and `gateway demo-provider`.

Owns turning command-line options into a running server. Must not hold request logic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from gateway import __version__, metrics
from gateway.app import create_app
from gateway.cli.workers import run_master
from gateway.config import DemoSettings, ServerSettings, Settings
from gateway.config_load import ConfigError, load_settings
from gateway.demo import DemoControl, start_demo
from gateway.log import configure_logging, get_logger
from gateway.routes import DRAINING

log = get_logger("gateway.serve")
MAX_HEADER_BYTES = 32 * 1024
DRAIN_GRACE = 2.0
"""Seconds past the worst-case drain after which a stuck process exits anyway."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="YAML config file (default: embedded)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides server.workers)")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--metrics-multiprocess-dir", type=Path, help=argparse.SUPPRESS)
    serve.set_defaults(run=run_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)
    check.set_defaults(run=run_config_check)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=lambda args: print(__version__) or 0)

    demo = commands.add_parser("demo-provider", help="run the OpenAI-compatible demo provider")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--mode", choices=["echo", "lorem", "script"], default="echo")
    demo.add_argument("--script", type=Path, help="YAML file of scripted replies")
    demo.add_argument("--latency-ms", type=float, default=0.0)
    demo.add_argument("--chunk-delay-ms", type=float, default=0.0)
    demo.add_argument("--chunk-chars", type=int, default=4)
    demo.add_argument("--reply-words", type=int, default=24)
    demo.set_defaults(run=run_demo_provider)


def settings_from(args: argparse.Namespace) -> Settings:
    """Loads `--config` (or the embedded default) and applies command-line overrides."""
    settings = load_settings(getattr(args, "config", None))
    names = ("host", "port", "workers", "metrics_multiprocess_dir")
    given = {k: getattr(args, k, None) for k in names}
    server = {k: v for k, v in given.items() if v is not None}
    if not server:
        return settings
    return settings.model_copy(update={"server": settings.server.model_copy(update=server)})


def run_config_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except ConfigError as error:
        for problem in error.problems:
            print(f"{error.source}: {problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(settings.providers)} providers, {len(settings.models)} models)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """One process, or with `--workers N` a master that runs N of them on one port."""
    settings = settings_from(args)
    configure_logging(settings.logging.level, settings.logging.format)
    if settings.server.workers > 1 and not args.worker:
        return run_master(settings, args.config)
    if args.worker:
        # The master turns Ctrl-C into one SIGTERM per worker; taking SIGINT too would count
        # as a second signal and skip the drain.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _install_uvloop()
    asyncio.run(serve(settings, parent_pid=os.getppid() if args.worker else None))
    return 0


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings: Settings, *, parent_pid: int | None = None) -> None:
    """Serves until SIGTERM (or SIGINT), then drains: see `_drain`.

    `parent_pid` is the master of a worker: if it disappears, the worker drains and exits.
    """
    server = settings.server
    app = create_app(settings)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=server.shutdown_timeout,
        # Room for headers up to MAX_HEADER_BYTES, so an oversized token reaches the gateway's
        # own check (a clean 401) instead of aiohttp's parser.
        max_field_size=MAX_HEADER_BYTES, max_line_size=MAX_HEADER_BYTES,
    )  # fmt: skip
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.port, reuse_port=server.workers > 1)
    frozen = tune_gc(server)  # before the port opens: no request waits on the collection
    await site.start()
    log.info("gateway_started", host=server.host, port=server.port, version=__version__,
             pid=os.getpid(), gc_threshold=gc.get_threshold()[0],
             gc_frozen_objects=frozen)  # fmt: skip
    await _wait_for_stop(parent_pid)
    await _drain(app, runner, settings)


def tune_gc(server: ServerSettings) -> int:
    """Applies `server.gc_freeze` and `server.gc_threshold`; returns how many objects are frozen.

    Reference counting frees a finished request's objects at once, so what the cyclic
    collector mostly finds is requests still in flight: it scans them, promotes them, and
    every few runs rescans all of the modules, config and policies in a full collection. At
    the interpreter's threshold of 700 that was 8-13% of the gateway's CPU at 32-64 requests
    in flight. With a larger threshold in-flight work finishes between runs, and what startup
    built, frozen, is never scanned again. What is frozen and later dropped in a reference
    cycle (the first policy set, after a reload) is kept: once, not per reload.
    """
    if server.gc_freeze:
        gc.collect()
        gc.freeze()
    if server.gc_threshold:
        _, middle, oldest = gc.get_threshold()
        gc.set_threshold(server.gc_threshold, middle, oldest)
    return gc.get_freeze_count()


async def _wait_for_stop(parent_pid: int | None) -> None:
    """Returns on the first SIGTERM or SIGINT, after which a second one exits at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM,) if parent_pid else (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    watcher = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    for signum in signals:
        loop.add_signal_handler(signum, _exit_now, signum)


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # No event tells a process its parent died; polling once a second is cheap.
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    log.warning("master_gone", master_pid=parent_pid)
    stop.set()


def _exit_now(signum: int) -> None:
    log.warning("gateway_exit_forced", signal=signal.Signals(signum).name)
    os._exit(1)


def _exit_overran(seconds: float) -> None:
    log.error("gateway_drain_overran", seconds=seconds)
    os._exit(1)


async def _drain(app: web.Application, runner: web.AppRunner, settings: Settings) -> None:
    """Readiness turns false; after `drain_delay` the port closes and idle connections go;
    in-flight requests and streams get `shutdown_timeout` to finish, then are cancelled."""
    server = settings.server
    app[DRAINING][0] = True
    # aiohttp waits up to shutdown_timeout for handlers, then as long again for cancelled
    # ones; a resource that still hangs on close after that must not keep the process alive.
    overrun = server.drain_delay + 2 * server.shutdown_timeout + DRAIN_GRACE
    asyncio.get_running_loop().call_later(overrun, _exit_overran, overrun)
    log.info("gateway_draining", drain_delay_seconds=server.drain_delay,
             deadline_seconds=server.shutdown_timeout)  # fmt: skip
    await asyncio.sleep(server.drain_delay)
    await runner.cleanup()
    metrics.flush_shared()  # the last requests' counts, before the loop stops
    log.info("gateway_stopped")


def run_demo_provider(args: argparse.Namespace) -> int:
    configure_logging()
    settings = DemoSettings(
        mode=args.mode, script_file=args.script, latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms, chunk_chars=args.chunk_chars,
        reply_words=args.reply_words,
    )  # fmt: skip
    _install_uvloop()
    asyncio.run(_demo(args.host, args.port, DemoControl(settings=settings)))
    return 0


async def _demo(host: str, port: int, control: DemoControl) -> None:
    runner = await start_demo(host, port, control)
    log.info("demo_provider_started", host=host, port=port, mode=control.settings.mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
