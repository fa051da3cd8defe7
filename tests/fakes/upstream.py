"""A local OpenAI-compatible provider for tests: the gateway's demo provider on a free port.

Tests steer it through `control` (scripted replies and chunk boundaries, faults such as error
statuses, hangs and streams that die) and read `control.received` to see what the provider got.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import DemoSettings
from gateway.demo import DemoControl, Fault, bound_port, start_demo
from gateway.demo_wire import ScriptedReply

__all__ = ["FakeProvider", "Fault", "ScriptedReply"]


@dataclass
class FakeProvider:
    settings: DemoSettings = field(default_factory=DemoSettings)
    control: DemoControl = field(init=False)
    runner: web.AppRunner | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.control = DemoControl(settings=self.settings)

    async def start(self) -> FakeProvider:
        self.runner = await start_demo("127.0.0.1", 0, self.control)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        assert self.runner is not None
        return f"http://127.0.0.1:{bound_port(self.runner)}/v1"

    @property
    def last(self) -> dict:
        """The body of the last request the provider received."""
        return self.control.received[-1].body

    def reply(self, text: str, chunks: list[str] | None = None) -> None:
        """Scripts the next reply (and, for streams, its exact chunk boundaries)."""
        self.control.replies.append(ScriptedReply(text, chunks))

    def fail(self, fault: Fault) -> None:
        self.control.faults.append(fault)
