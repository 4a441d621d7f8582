"""A FastAPI app of the shapes real services have, for tests/http/test_frameworks.py.

/pid                       {"pid": ...}
/sse?id=X                  a Server-Sent-Events stream that never ends by itself; writes
                           MARKERS/sse-started-X, and MARKERS/sse-stopped-X from its finally
/numbers?n=N               N lines "i\\n" streamed one by one (no length)
/background?id=X&secs=S    answers at once; a BackgroundTasks job then sleeps S seconds and
                           writes MARKERS/bg-done-X, or MARKERS/bg-cancelled-X if cancelled
/overrun                   declares content-length 5 and sends 10 bytes
/items/{id} (POST, JSON)   validation by pydantic: 422 on a bad body
MARKERS is the folder in env HTTP_PROBE_MARKERS."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

app = FastAPI()


def _marker(name: str) -> None:
    folder = Path(os.environ["HTTP_PROBE_MARKERS"])
    tmp = folder / f".{name}.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(folder / name)


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/sse")
async def sse(id: str) -> StreamingResponse:
    async def events():  # type: ignore[no-untyped-def]
        _marker(f"sse-started-{id}")
        number = 0
        try:
            while True:
                yield f"data: {number}\n\n"
                number += 1
                await asyncio.sleep(0.05)
        finally:
            _marker(f"sse-stopped-{id}")

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/numbers")
async def numbers(n: int) -> StreamingResponse:
    async def lines():  # type: ignore[no-untyped-def]
        for i in range(n):
            yield f"{i}\n"

    return StreamingResponse(lines(), media_type="text/plain")


async def _job(id: str, secs: float) -> None:
    try:
        await asyncio.sleep(secs)
    except asyncio.CancelledError:
        _marker(f"bg-cancelled-{id}")
        raise
    _marker(f"bg-done-{id}")


@app.get("/background")
async def background(id: str, secs: float, tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(_job, id, secs)
    return {"queued": id}


@app.get("/overrun")
async def overrun() -> Response:
    return Response(b"0123456789", headers={"content-length": "5"})


class Item(BaseModel):
    name: str
    price: float


@app.post("/items/{item_id}")
async def create(item_id: int, item: Item) -> dict[str, object]:
    return {"id": item_id, "name": item.name, "price": item.price}
