"""The one typed, frozen `Settings` object, and how it is built from YAML and the environment.

Owns every configuration option (type, safe default, one-line description), `${VAR}`
substitution and `GATEWAY_*` overrides. Must not be read from anywhere but `__main__` (which
builds it once) and must not log secrets: they are `SecretStr`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

DEFAULTS_DIR = Path(__file__).parent / "defaults"
ENV_PREFIX = "GATEWAY_"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Section(BaseModel):
    """Base of every config section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(Section):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(1, ge=1, le=64, description="Worker processes sharing the port.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body.")
    shutdown_timeout: float = Field(
        30.0, gt=0, description="Seconds in-flight requests get to finish after SIGTERM."
    )
    trust_forwarded_for: bool = Field(
        False, description="Take the client address from X-Forwarded-For (behind a proxy)."
    )


class Timeouts(Section):
    connect: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    first_byte: float = Field(60.0, gt=0, description="Seconds until response headers arrive.")
    idle: float = Field(30.0, gt=0, description="Longest silence between stream chunks.")
    total: float = Field(600.0, gt=0, description="Longest whole request to the provider.")


class Retries(Section):
    attempts: int = Field(2, ge=0, le=10, description="Retries after the first try.")
    backoff_initial: float = Field(0.25, ge=0, description="First backoff in seconds.")
    backoff_max: float = Field(4.0, ge=0, description="Longest backoff (and Retry-After honoured).")
    on_status: tuple[int, ...] = Field(
        (429, 500, 502, 503, 504), description="Provider statuses that are retried."
    )


class DemoSettings(Section):
    latency_ms: float = Field(0.0, ge=0, description="Delay before answering.")
    chunk_delay_ms: float = Field(0.0, ge=0, description="Delay between stream chunks.")
    chunk_chars: int = Field(4, ge=1, description="Characters per stream chunk.")
    reply_words: int = Field(24, ge=1, description="Length of the generated reply in words.")
    mode: Literal["echo", "lorem", "script"] = Field("echo", description="How replies are made.")
    script_file: Path | None = Field(None, description="YAML file of scripted replies.")


class ProviderSettings(Section):
    kind: Literal["openai", "azure", "demo"] = Field("openai", description="Wire dialect.")
    base_url: str = Field("", description="Provider API root, e.g. https://api.openai.com/v1.")
    api_key: SecretStr | None = Field(None, description="Provider key, injected upstream.")
    api_version: str | None = Field(None, description="Azure api-version query parameter.")
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    headers: dict[str, str] = Field({}, description="Extra headers sent to this provider.")
    fallbacks: tuple[str, ...] = Field((), description="Providers tried, in order, if this fails.")
    max_connections: int = Field(256, ge=1, description="Connection pool size.")
    demo: DemoSettings = DemoSettings()

    @model_validator(mode="after")
    def _needs_url(self) -> ProviderSettings:
        if self.kind != "demo" and not self.base_url:
            raise ValueError("base_url is required unless kind is demo")
        if self.kind == "azure" and not self.api_version:
            raise ValueError("api_version is required for kind azure")
        return self


class ModelSettings(Section):
    name: str = Field(description="Model name clients ask for.")
    provider: str = Field(description="Key of `providers` that serves it.")
    upstream_model: str | None = Field(None, description="Name sent to the provider.")
    owned_by: str = Field("gateway", description="`owned_by` shown in /v1/models.")
    fallback_models: dict[str, str] = Field(
        {}, description="Upstream model name to use at each fallback provider."
    )


class RedisSettings(Section):
    url: SecretStr | None = Field(None, description="redis:// or rediss:// URL; none = embedded.")
    timeout: float = Field(0.25, gt=0, description="Seconds per Redis command.")


class AuthSettings(Section):
    mode: Literal["required", "disabled"] = Field(
        "required", description="`disabled` lets anyone in (logged loudly at startup)."
    )


class LimitSettings(Section):
    enabled: bool = Field(False, description="Apply rate limits and budgets.")


class RedactionSettings(Section):
    enabled: bool = Field(False, description="Redact prompts before they reach a provider.")


class PolicySettings(Section):
    directory: Path | None = Field(None, description="Directory of policy YAML files.")


class AuditSettings(Section):
    enabled: bool = Field(True, description="Write one audit event per request.")


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["json", "console"] = Field("json", description="Log line format.")


class Settings(Section):
    server: ServerSettings = ServerSettings()
    providers: dict[str, ProviderSettings] = Field(description="Upstream providers by name.")
    models: tuple[ModelSettings, ...] = Field(description="Models clients may ask for.")
    redis: RedisSettings = RedisSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    redaction: RedactionSettings = RedactionSettings()
    policies: PolicySettings = PolicySettings()
    audit: AuditSettings = AuditSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _references_exist(self) -> Settings:
        names = set(self.providers)
        for model in self.models:
            if model.provider not in names:
                raise ValueError(f"model {model.name!r} names unknown provider {model.provider!r}")
        for name, provider in self.providers.items():
            for fallback in provider.fallbacks:
                if fallback not in names or fallback == name:
                    raise ValueError(f"provider {name!r} has invalid fallback {fallback!r}")
        seen = [m.name for m in self.models]
        if len(seen) != len(set(seen)):
            raise ValueError("model names must be unique")
        return self


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
