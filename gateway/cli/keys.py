"""`gateway keys create | list | revoke | rotate`: manage gateway API keys from the shell.

Owns turning command-line options into key store calls on the store that `--config` names
(Redis when it names one, the key file otherwise). Prints a new key once, on stdout alone, so
`export OPENAI_API_KEY=$(gateway keys create --name demo)` works. Must not log keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from gateway.api_keys import ApiKey, KeySpec, KeyStore, parse_duration, parse_names
from gateway.config_load import load_settings
from gateway.errors import GatewayError
from gateway.keystore import open_key_store
from gateway.log import configure_logging, get_logger

_T = TypeVar("_T")
log = get_logger("gateway.security")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="manage gateway API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--tenant", help="tenant the key belongs to")
    create.add_argument("--models", type=parse_names, help="allowed model globs: 'gpt-4o*,fast'")
    create.add_argument("--endpoints", type=parse_names, help="allowed endpoints: 'chat.*,models'")
    create.add_argument("--roles", type=parse_names, default=(), help="roles: 'gateway-admin'")
    create.add_argument("--tier", help="rate-limit tier")
    create.add_argument("--expires", type=_duration, help="lifetime: 90s, 15m, 1h, 30d, 2w")
    create.set_defaults(run=run_create)

    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(run=run_list)

    revoke = actions.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=run_revoke)

    rotate = actions.add_parser("rotate", help="give a key a new secret; the old one lingers")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", type=_duration, default=3600.0,
                        help="how long the old secret keeps working (default 1h)")  # fmt: skip
    rotate.set_defaults(run=run_rotate)

    for command in (create, listing, revoke, rotate):
        command.add_argument("--config", type=Path, help="YAML config file (default: embedded)")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def run_create(args: argparse.Namespace) -> int:
    spec = KeySpec(name=args.name, tenant=args.tenant, roles=tuple(args.roles),
                   models=args.models, endpoints=args.endpoints, tier=args.tier,
                   expires_in=args.expires)  # fmt: skip
    created = _with_store(args, lambda store: store.create(spec))
    if created is None:
        return 1
    record, secret = created
    log.info("key_created", audit=True, via="cli", key_id=record.id)
    print(f"Created key {record.id} ({record.name}). It is shown once; store it now:",
          file=sys.stderr)  # fmt: skip
    print(secret)
    return 0


def run_list(args: argparse.Namespace) -> int:
    records = _with_store(args, lambda store: store.list_keys())
    if records is None:
        return 1
    now = time.time()
    if args.json:
        for record in records:
            print(json.dumps(record.public(now)))
        return 0
    print(f"{'ID':<21} {'NAME':<20} {'STATUS':<8} {'TENANT':<12} {'MODELS':<20} EXPIRES")
    for record in records:
        print(_row(record, now))
    return 0


def _row(record: ApiKey, now: float) -> str:
    models = ",".join(record.models) if record.models is not None else "(default)"
    expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.expires_at)) if (
        record.expires_at) else "never"  # fmt: skip
    return (f"{record.id:<21} {record.name[:20]:<20} {record.status(now):<8} "
            f"{(record.tenant or '-')[:12]:<12} {models[:20]:<20} {expires}")  # fmt: skip


def run_revoke(args: argparse.Namespace) -> int:
    record = _with_store(args, lambda store: store.revoke(args.key_id))
    if record is None:
        return 1
    log.info("key_revoked", audit=True, via="cli", key_id=record.id)
    print(f"Revoked key {record.id} ({record.name}).")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    rotated = _with_store(args, lambda store: store.rotate(args.key_id, args.grace))
    if rotated is None:
        return 1
    record, secret = rotated
    log.info("key_rotated", audit=True, via="cli", key_id=record.id, grace_seconds=args.grace)
    print(f"Rotated key {record.id} ({record.name}); the old secret works for "
          f"{args.grace:g} more seconds. The new one is shown once:", file=sys.stderr)  # fmt: skip
    print(secret)
    return 0


def _with_store(args: argparse.Namespace, action: Callable[[KeyStore], Awaitable[_T]]) -> _T | None:
    """Runs `action` on the configured store; prints the error and returns None on failure."""
    configure_logging("info", "console", stream=sys.stderr)
    settings = load_settings(args.config)

    async def run() -> _T:
        store = await open_key_store(settings)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except GatewayError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return None
