"""The `gateway` command: builds the parser from each topic's `register` and runs one command.

Owns the entry point and the exit code. Must not hold command logic itself.
"""

from __future__ import annotations

import argparse
import sys

from gateway.cli import keys, policy, serve, soc
from gateway.config_load import ConfigError

TOPICS = (serve, soc, keys, policy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Secure LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    for topic in TOPICS:
        topic.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ConfigError as error:
        for problem in error.problems:
            print(f"{error.source}: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
