"""Retry decisions and request building of the upstream client."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ProviderSettings, Settings
from gateway.errors import NotFoundError, UpstreamError, UpstreamStatusError
from gateway.exchange import Exchange, JsonReply, Route
from gateway.upstream import Target, UpstreamClient, _retry_delay

PROVIDER = ProviderSettings(
    base_url="http://p/v1", retries={"backoff_initial": 0.1, "backoff_max": 2}
)


def status_error(status: int, retry_after: str | None = None) -> UpstreamStatusError:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return UpstreamStatusError(status, {"error": {"message": "x"}}, headers=headers)


def test_client_errors_are_never_retried():
    assert _retry_delay(status_error(400), 0, PROVIDER) is None
    assert _retry_delay(status_error(401), 0, PROVIDER) is None


def test_server_errors_back_off_exponentially_with_jitter():
    first = _retry_delay(status_error(503), 0, PROVIDER)
    third = _retry_delay(UpstreamError("down"), 2, PROVIDER)
    assert first is not None and 0.05 <= first <= 0.1
    assert third is not None and 0.2 <= third <= 0.4


def test_retry_after_is_honoured_up_to_the_cap():
    assert _retry_delay(status_error(429, "1.5"), 0, PROVIDER) == 1.5
    assert _retry_delay(status_error(429, "30"), 0, PROVIDER) is None


async def test_azure_requests_use_deployment_url_and_api_key_header():
    settings = Settings.model_validate({
        "providers": {"az": {"kind": "azure", "base_url": "https://n.openai.azure.com",
                             "api_key": "azure-secret", "api_version": "2024-10-21"}},
        "models": [{"name": "gpt-4o", "provider": "az", "upstream_model": "prod-4o"}],
    })  # fmt: skip
    client = UpstreamClient(settings)
    try:
        ex = Exchange("r", "chat.completions", "POST", "/v1/chat/completions",
                      {"Authorization": "Bearer client"}, "1.2.3.4",
                      raw_body=b'{"model":"gpt-4o"}', body={"model": "gpt-4o"})  # fmt: skip
        ex.route = Route("gpt-4o", "az", "prod-4o")
        target = Target("az", "https://n.openai.azure.com", settings.providers["az"])
        url, headers, data = client._request_for(ex, target)
    finally:
        await client.close()
    assert url == ("https://n.openai.azure.com/openai/deployments/prod-4o/chat/completions"
                   "?api-version=2024-10-21")  # fmt: skip
    assert headers["api-key"] == "azure-secret"
    assert "Authorization" not in headers
    assert b'"prod-4o"' in data
    assert "azure-secret" not in repr(target)  # the key read out once stays out of reprs


@pytest.mark.parametrize(("attempts", "tries"), [(0, 1), (1, 2)])
async def test_an_unreachable_provider_is_tried_once_plus_its_retries(attempts, tries):
    settings = Settings.model_validate({
        "providers": {"p": {"base_url": "http://127.0.0.1:1/v1",
                            "retries": {"attempts": attempts, "backoff_initial": 0.0}}},
        "models": [{"name": "m", "provider": "p"}],
    })  # fmt: skip
    client = UpstreamClient(settings)
    try:
        ex = Exchange("r", "chat.completions", "POST", "/v1/chat/completions", {}, "1.2.3.4",
                      raw_body=b'{"model":"m"}', body={"model": "m"})  # fmt: skip
        ex.route = Route("m", "p", "m")
        with pytest.raises(UpstreamError):
            await client.forward(ex)
    finally:
        await client.close()
    assert ex.upstream_attempts == tries and ex.provider == "p"


async def test_an_unrouted_model_is_refused_before_any_provider_call():
    client = UpstreamClient(Settings.model_validate({
        "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": [{"name": "m", "provider": "p"}],
    }))  # fmt: skip
    try:
        ex = Exchange("r", "chat.completions", "POST", "/v1/chat/completions", {}, "1.2.3.4")
        with pytest.raises(NotFoundError):
            await client.forward(ex)
    finally:
        await client.close()
    assert ex.upstream_attempts == 0


async def test_answers_read_whole_leave_their_connection_to_the_next_call():
    """A JSON answer, or an error status with its body, is read whole and closed without a
    separate release; the pooled connection carries the next call (one client port)."""
    ports: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        status = 500 if len(ports) == 2 else 200
        return web.json_response({"id": "c", "error": {"message": "x"}}, status=status)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        client = UpstreamClient(Settings.model_validate({
            "providers": {"p": {"base_url": f"http://127.0.0.1:{server.port}/v1",
                                "retries": {"attempts": 0}}},
            "models": [{"name": "m", "provider": "p"}],
        }))  # fmt: skip
        try:
            for expected in (200, 500, 200):
                ex = Exchange("r", "chat.completions", "POST", "/v1/chat/completions", {}, "",
                              raw_body=b'{"model":"m"}', body={"model": "m"})  # fmt: skip
                ex.route = Route("m", "p", "m")
                if expected == 200:
                    reply = await client.forward(ex)
                    assert isinstance(reply, JsonReply) and b'"c"' in reply.raw
                else:
                    with pytest.raises(UpstreamStatusError):
                        await client.forward(ex)
        finally:
            await client.close()
    assert len(ports) == 3 and len(set(ports)) == 1
