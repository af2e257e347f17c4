"""One client connection of the replay exchange: its send queue and the task that writes it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

if TYPE_CHECKING:  # pragma: no cover
    from engine.sim.replay.server import ReplayServer

STOP = object()  # queue item: the writer ends
ABORT = object()  # queue item: the TCP connection is aborted (no close frame)


class Conn:
    """A connected client. The feed and the protocol `put` text frames; `writer()` sends them in
    order. `state` is the protocol's per-connection state (`ReplayProtocol.new_conn_state()`)."""

    def __init__(self, server: ReplayServer, ws: ServerConnection, cid: int):
        self.server = server
        self.ws = ws
        self.id = cid
        self.q: asyncio.Queue = asyncio.Queue()
        self.alive = True
        self.state: Any = server.protocol.new_conn_state()

    def put(self, item) -> None:
        if self.alive:
            self.q.put_nowait(item)

    @property
    def subscribed(self) -> bool:
        return self.server.protocol.is_subscribed(self)

    async def writer(self) -> None:
        st = self.server.counters
        try:
            while True:
                item = await self.q.get()
                if item is STOP:
                    return
                if item is ABORT:
                    transport = getattr(self.ws, "transport", None)
                    if transport is not None:
                        transport.abort()
                    return
                await self.ws.send(item)
                st["frames_sent"] += 1
                st["bytes_sent"] += len(item)
        except ConnectionClosed:
            pass
        finally:
            self.alive = False
