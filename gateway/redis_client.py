"""One way to open a Redis client from `RedisSettings`, for every engine that keeps shared state.

Owns the topology (standalone, Sentinel, Cluster), AUTH, TLS, timeouts and the one immediate
retry on a broken pooled connection. Must not run commands or translate errors: each engine
does that at its own boundary.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config import RedisSettings

_DEFAULT_URL = "redis://127.0.0.1:6379/0"


def open_redis(
    settings: RedisSettings, *, socket_timeout: float | None = -1.0, decode_responses: bool = False
) -> Redis | RedisCluster:
    """A client for the configured topology; it connects lazily, on first use.

    `socket_timeout` defaults to `settings.timeout`; None waits forever (pub/sub listeners).
    """
    timeout = settings.timeout if socket_timeout == -1.0 else socket_timeout
    options = _client_options(settings, timeout, decode_responses)
    url = settings.url.get_secret_value() if settings.url else _DEFAULT_URL
    if settings.tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    if settings.mode == "cluster":
        return RedisCluster.from_url(url, **options)
    if settings.mode == "sentinel":
        hosts = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in settings.sentinels]
        secret = settings.sentinel_password
        password = secret.get_secret_value() if secret else None
        sentinel_options = {"socket_timeout": settings.timeout, "ssl": settings.tls,
                            "password": password}  # fmt: skip
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs=sentinel_options, ssl=settings.tls, **options
        )
        client: Redis = sentinel.master_for(settings.sentinel_master, db=settings.db)
        return client
    return Redis.from_url(url, db=settings.db, **options)


def _client_options(
    settings: RedisSettings, timeout: float | None, decode_responses: bool
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": settings.connect_timeout,
        # One immediate retry on a broken connection (a pooled socket from before a Redis
        # restart); timeouts are not retried: each engine decides about a slow Redis.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "max_connections": settings.max_connections,
        "decode_responses": decode_responses,
    }
    if settings.username:
        options["username"] = settings.username
    if settings.password:
        options["password"] = settings.password.get_secret_value()
    url = settings.url.get_secret_value() if settings.url else ""
    if settings.tls or url.startswith("rediss://"):
        options["ssl_cert_reqs"] = "required" if settings.tls_verify else "none"
        options["ssl_check_hostname"] = settings.tls_verify
        for name, path in (("ssl_ca_certs", settings.tls_ca_file),
                           ("ssl_certfile", settings.tls_cert_file),
                           ("ssl_keyfile", settings.tls_key_file)):  # fmt: skip
            if path is not None:
                options[name] = str(path)
    return options
