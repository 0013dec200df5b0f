"""The in-flight body budget (``BodyLimitMiddleware``) counts bytes as they arrive, not as declared.

A request that declared 64 MiB and sent one byte used to reserve the whole 64 MiB, so every other request
with a body on that worker answered 503 while it stalled (issue #11).
"""

from __future__ import annotations

import asyncio

import orjson

from service.api.limits import BodyLimitMiddleware

LIMIT = 1000


class Client:
    """One request fed to the middleware chunk by chunk, under the test's control."""

    def __init__(self, limiter: BodyLimitMiddleware, declared: int | None) -> None:
        headers = [] if declared is None else [(b"content-length", str(declared).encode())]
        self.scope = {"type": "http", "method": "POST", "path": "/v1/metrics", "headers": headers}
        self.chunks: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.task = asyncio.ensure_future(limiter(self.scope, self.receive, self.send))

    async def receive(self) -> dict:
        return await self.chunks.get()

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def feed(self, size: int, *, more: bool = True) -> None:
        self.chunks.put_nowait({"type": "http.request", "body": b"x" * size, "more_body": more})

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    def detail(self) -> str:
        return orjson.loads(self.sent[-1]["body"])["detail"]


async def read_all(scope, receive, send) -> None:
    total = 0
    while True:
        message = await receive()
        total += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(total).encode()})


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_stalled_declared_body_reserves_only_what_arrived():
    async def scenario() -> None:
        limiter = BodyLimitMiddleware(read_all, max_body_bytes=LIMIT)
        stalled = Client(limiter, declared=LIMIT)
        stalled.feed(1)
        await settle()
        assert limiter.bytes_in_flight == 1
        for _ in range(3):  # others with bodies are served meanwhile
            other = Client(limiter, declared=500)
            other.feed(500, more=False)
            await asyncio.wait_for(other.task, 5)
            assert other.status == 200
        assert limiter.bytes_in_flight == 1
        stalled.feed(LIMIT - 1, more=False)
        await asyncio.wait_for(stalled.task, 5)
        assert stalled.status == 200 and limiter.bytes_in_flight == 0

    asyncio.run(scenario())


def test_bytes_held_still_bound_the_others():
    async def scenario() -> None:
        limiter = BodyLimitMiddleware(read_all, max_body_bytes=LIMIT)
        held = Client(limiter, declared=LIMIT)
        held.feed(700)
        await settle()
        # declared up front: refused before reading
        declared = Client(limiter, declared=600)
        declared.feed(600, more=False)
        await asyncio.wait_for(declared.task, 5)
        assert declared.status == 503 and "CALIBSERVE_MAX_BODY_BYTES" in declared.detail()
        # chunked (nothing declared): refused at the chunk that would pass the budget, then drained
        chunked = Client(limiter, declared=None)
        chunked.feed(200)
        chunked.feed(200)
        chunked.feed(10, more=False)
        await asyncio.wait_for(chunked.task, 5)
        assert chunked.status == 503
        assert ("connection", "close") in [(k.decode(), v.decode()) for k, v in chunked.sent[0]["headers"]]
        assert limiter.bytes_in_flight == 700
        held.feed(300, more=False)  # one request alone always completes
        await asyncio.wait_for(held.task, 5)
        assert held.status == 200 and limiter.bytes_in_flight == 0

    asyncio.run(scenario())
