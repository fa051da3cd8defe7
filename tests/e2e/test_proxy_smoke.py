"""The smallest end-to-end path: SDK -> gateway -> fake provider -> SDK."""

from tests.conftest import PROVIDER_KEY, TEST_KEY


async def test_chat_completion_reaches_provider_with_its_key(gateway, provider):
    client = gateway.client()
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "ping pong"}]
    )
    assert completion.choices[0].message.content == "ping pong"
    received = provider.control.received[-1]
    assert received.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert TEST_KEY not in str(received.headers)
