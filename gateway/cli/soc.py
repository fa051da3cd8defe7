"""`gateway soc pseudonym`, `gateway soc report` and `gateway audit verify`: tools for the SOC.

Owns turning command-line options into pseudonyms, reports and tamper checks. Must not print
keys, and must not change the logs it reads.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.audit_privacy import Pseudonymizer
from gateway.audit_verify import read_lines, verify
from gateway.config_load import load_settings
from gateway.soc_report import (
    build_report,
    parse_events,
    render_html,
    render_json,
    render_markdown,
)

_RENDERERS = {"md": render_markdown, "json": render_json, "html": render_html}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    soc = commands.add_parser("soc", help="tools for the security operations centre")
    soc_commands = soc.add_subparsers(dest="soc_command", required=True)
    pseudonym = soc_commands.add_parser("pseudonym", help="the pseudonym of a known subject")
    pseudonym.add_argument("subject", help="user subject (or tenant with --tenant)")
    pseudonym.add_argument("--tenant", action="store_true", help="SUBJECT is a tenant")
    pseudonym.add_argument("--config", type=Path, help="YAML config file (default: embedded)")
    pseudonym.set_defaults(run=run_pseudonym)

    report = soc_commands.add_parser("report", help="summarise audit logs")
    report.add_argument("logfiles", nargs="+", type=Path, metavar="LOGFILE")
    report.add_argument("--since", type=since_value,
                        help="ISO time or a duration such as 24h, 7d, 30m")  # fmt: skip
    report.add_argument("--format", choices=sorted(_RENDERERS), default="md")
    report.add_argument("--output", type=Path, help="write here instead of stdout")
    report.set_defaults(run=run_report)

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    check = audit_commands.add_parser("verify", help="check audit logs for gaps, edits, reorders")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE",
                       help="files in order (oldest rotated file first)")  # fmt: skip
    check.set_defaults(run=run_verify)


def since_value(text: str) -> datetime:
    """`2024-05-01T00:00Z`, or a duration back from now: `90m`, `24h`, `7d`."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a time or duration: {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def run_pseudonym(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if not settings.audit.pseudonym_keys:
        print("audit.pseudonym_keys is not configured: each process uses a random key, so "
              "pseudonyms cannot be reproduced.", file=sys.stderr)  # fmt: skip
        return 1
    names = Pseudonymizer.from_settings(settings.audit)
    for key_id, key in names.keys:
        one = Pseudonymizer([(key_id, key)])
        value = one.tenant(args.subject) if args.tenant else one.user(args.subject)
        print(f"{value}\tkey_id={key_id}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    events = parse_events(_lines(args.logfiles), args.since)
    text = _RENDERERS[args.format](build_report(events, args.since))
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _lines(paths: list[Path]) -> list[str]:
    return [text for _, text in read_lines(paths)]


def run_verify(args: argparse.Namespace) -> int:
    verdict = verify(read_lines(args.files))
    for note in verdict.notes:
        print(f"note: {note}")
    for problem in verdict.problems:
        print(f"{problem.where}: {problem.kind}: {problem.detail} [stream {problem.stream}]")
    state = "intact" if verdict.intact else f"{len(verdict.problems)} problem(s)"
    print(f"{verdict.events} events in {verdict.streams} stream(s): {state}")
    return 0 if verdict.intact else 1
