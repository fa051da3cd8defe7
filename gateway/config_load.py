"""Building `Settings` from a YAML file and the environment.

Owns reading the file (or the shipped default), `${VAR}` substitution, `GATEWAY_*` overrides
and turning validation errors into `ConfigError` lines that name each bad key by its dotted
path. Must not define options (`gateway.config` does) nor log secrets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config import Settings

DEFAULTS_DIR = Path(__file__).parent / "defaults"
ENV_PREFIX = "GATEWAY_"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists `path: message` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Reads `path` (or the shipped default) and returns validated settings.

    Raises `ConfigError` naming every bad key by its dotted path.
    """
    environ = os.environ if env is None else env
    source = path or default_config_path(environ)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(source), [f"cannot read file: {exc.strerror}"]) from exc
    try:
        raw = yaml.safe_load(_substitute(text, environ)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(source), [f"not valid YAML: {exc}"]) from exc
    except KeyError as exc:
        raise ConfigError(str(source), [f"environment variable {exc.args[0]} is not set"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(source), ["the top level must be a mapping"])
    _apply_overrides(raw, environ)
    return _validate(raw, str(source))


def default_config_path(env: Mapping[str, str]) -> Path:
    """The shipped config: OpenAI when `OPENAI_API_KEY` is set, the demo provider otherwise."""
    name = "openai.yaml" if env.get("OPENAI_API_KEY") else "demo.yaml"
    return DEFAULTS_DIR / name


def _validate(raw: dict[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(top level)"
            problems.append(f"{where}: {error['msg']}")
        raise ConfigError(source, problems) from exc


def _substitute(text: str, env: Mapping[str, str]) -> str:
    """Replaces `${VAR}` and `${VAR:-default}`; a missing VAR without default is a KeyError."""

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    lines = [line if line.lstrip().startswith("#") else _VAR.sub(value, line)
             for line in text.splitlines()]  # fmt: skip
    return "\n".join(lines)


def _apply_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """`GATEWAY_SERVER__PORT=9000` sets `server.port`; `__` separates levels."""
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[path[-1]] = yaml.safe_load(value)
