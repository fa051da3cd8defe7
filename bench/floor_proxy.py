"""The floor: the least a Python aiohttp reverse proxy can do, to measure the gateway against.

Receives a request, forwards its body to the upstream with one shared `ClientSession`, and
returns the response, streaming chunks back as they arrive. No validation, no header hygiene,
no metrics, no logs: whatever the gateway costs beyond this is the price of its features.

With `--processes N` it runs N such processes on one port (SO_REUSEPORT, the kernel spreads
connections), the baseline for a gateway with `--workers N`: the parent forks the others
before any event loop exists, and each child exits when the parent does.

`python bench/floor_proxy.py --port P --upstream http://127.0.0.1:Q [--processes N]`
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from common import install_uvloop

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer floor-provider-key"}
    url = request.app[UPSTREAM] + request.path_qs
    async with request.app[SESSION].request(
        request.method, url, data=body, headers=headers
    ) as upstream:
        if upstream.content_type != "text/event-stream":
            return web.Response(
                status=upstream.status, body=await upstream.read(),
                content_type=upstream.content_type,
            )  # fmt: skip
        response = web.StreamResponse(status=upstream.status,
                                      headers={"Content-Type": "text/event-stream"})  # fmt: skip
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    yield
    await app[SESSION].close()


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.router.add_route("*", "/{tail:.*}", forward)
    app.cleanup_ctx.append(_session)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--processes", type=int, default=1, help="processes on the one port")
    args = parser.parse_args()
    for _ in range(args.processes - 1):
        if os.fork() == 0:
            _die_with_parent()
            break
    install_uvloop()
    web.run_app(
        create_app(args.upstream), host=args.host, port=args.port, access_log=None,
        print=None, handler_cancellation=True, reuse_port=args.processes > 1,
    )  # fmt: skip


def _die_with_parent() -> None:
    """A forked child gets SIGTERM when the parent exits (Linux), so none is left behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


if __name__ == "__main__":
    main()
