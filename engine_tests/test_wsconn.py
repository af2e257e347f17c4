"""The collector's batch-reading WebSocket connection (`engine.collect.wsconn`) against real servers on
127.0.0.1: every message arrives once, in order, however the byte stream is cut, with pings,
fragmented, binary, large and invalid messages mixed in. Counted, never timed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import struct

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

from engine.collect.wsconn import BatchConnection

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def _drain(ws: BatchConnection, timeout: float = 10.0) -> tuple[list, list]:
    """Every message until the server closes: (messages, receive time of each)."""
    got, times = [], []
    async with asyncio.timeout(timeout):
        while True:
            try:
                batches = await ws.take()
            except ConnectionClosedOK:
                return got, times
            for recv_ns, msgs in batches:
                got += msgs
                times += [recv_ns] * len(msgs)


def _messages(n: int, seed: int = 3) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = rng.choice((10, 100, 125, 126, 127, 800, 65535, 65536, 70_000))
        body = f'{{"i":{i},"pad":"' + "x" * size + '"}'
        out.append(body if i % 7 else body.encode())  # every 7th binary
    return out


@pytest.mark.parametrize("tick_ms,subscribe_first", [(0.0, True), (2.0, True), (0.0, False)])
def test_stock_server_every_message_once_in_order_with_pings_and_fragments(tick_ms, subscribe_first):
    """subscribe_first: the server sends after the client's first message (as exchanges do); else at
    once, so the handshake's read may end inside a frame (the stock parser keeps the stream then)."""
    msgs = _messages(600)

    async def handler(ws):
        if subscribe_first:
            await ws.recv()
        for i, m in enumerate(msgs):
            if i % 50 == 0:
                await ws.ping()
            if i % 97 == 5:  # a fragmented message: three frames
                third = len(m) // 3
                await ws.send([m[:third], m[third:2 * third], m[2 * third:]])
            else:
                await ws.send(m)
        await ws.close()

    async def main():
        async with serve(handler, "127.0.0.1", 0, compression=None) as srv:
            port = srv.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", create_connection=BatchConnection, max_size=1 << 20,
                               compression=None) as ws:
                ws.tick_s = tick_ms / 1000
                await ws.send("subscribe")
                got, times = await _drain(ws)
                return got, times, ws.fast_frames

    got, times, fast = asyncio.run(main())
    assert got == msgs  # text as str, binary as bytes, nothing lost, duplicated or reordered
    assert times == sorted(times)
    if subscribe_first:  # the direct path took part (pings and fragments went through the stock parser)
        assert 0 < fast < len(msgs)


def _frame(payload: bytes, op: int = 1, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | op])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


async def _raw_server(stream: bytes, cuts: list[int]):
    """A WebSocket server written by hand: the handshake, then `stream` in pieces cut at `cuts`
    (each piece its own write, with a pause so it is its own read), then a close frame."""

    async def handle(reader, writer):
        req = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in req.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        prev = 0
        for c in [*cuts, len(stream)]:
            writer.write(stream[prev:c])
            await writer.drain()
            await asyncio.sleep(0.002)
            prev = c
        writer.write(_frame(struct.pack("!H", 1000), op=8))
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(100), 5)  # the client's close frame
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_stream_cut_anywhere_including_inside_headers():
    rng = random.Random(7)
    msgs = [("m%d:" % i + "y" * rng.choice((0, 5, 125, 126, 300, 65536))) for i in range(300)]
    parts = []
    for i, m in enumerate(msgs):
        if i % 41 == 3:
            parts.append(_frame(b"hi", op=9))  # a ping between data frames
        parts.append(_frame(m.encode()))
    stream = b"".join(parts)
    cuts = sorted(rng.sample(range(1, len(stream)), 400))  # reads end inside headers, payloads, anywhere

    async def main():
        srv = await _raw_server(stream, cuts)
        port = srv.sockets[0].getsockname()[1]
        try:
            async with connect(f"ws://127.0.0.1:{port}", create_connection=BatchConnection, max_size=1 << 20,
                               compression=None, ping_interval=None) as ws:
                got, _ = await _drain(ws)
                return got, ws.fast_frames
        finally:
            srv.close()

    got, fast = asyncio.run(main())
    assert got == msgs
    assert 0 < fast <= len(msgs)


def test_invalid_utf8_fails_with_1007_after_the_messages_before_it():
    stream = _frame(b'{"a":1}') + _frame(b'{"b":"\xff\xfe"}') + _frame(b'{"c":3}')

    async def main():
        srv = await _raw_server(stream, [])
        port = srv.sockets[0].getsockname()[1]
        got = []
        try:
            async with connect(f"ws://127.0.0.1:{port}", create_connection=BatchConnection,
                               compression=None, ping_interval=None) as ws:
                with pytest.raises(ConnectionClosedError) as e:
                    async with asyncio.timeout(10):
                        while True:
                            for _, msgs in await ws.take():
                                got += msgs
                return got, e.value.sent.code if e.value.sent else None
        finally:
            srv.close()

    got, code = asyncio.run(main())
    assert got == ['{"a":1}']
    assert code == 1007


def test_oversized_message_refused_like_the_stock_connection():
    stream = _frame(b"ok") + _frame(b"z" * 5000) + _frame(b"never")

    async def main():
        srv = await _raw_server(stream, [])
        port = srv.sockets[0].getsockname()[1]
        got = []
        try:
            async with connect(f"ws://127.0.0.1:{port}", create_connection=BatchConnection, max_size=1000,
                               compression=None, ping_interval=None) as ws:
                with pytest.raises(ConnectionClosedError) as e:
                    async with asyncio.timeout(10):
                        while True:
                            for _, msgs in await ws.take():
                                got += msgs
                return got, e.value.sent.code if e.value.sent else None
        finally:
            srv.close()

    got, code = asyncio.run(main())
    assert got == ["ok"]
    assert code == 1009


def test_reading_paused_while_max_queue_messages_wait_and_nothing_lost():
    msgs = [f"n{i}" for i in range(5000)]

    async def handler(ws):
        for m in msgs:
            await ws.send(m)
        await ws.close()

    async def main():
        async with serve(handler, "127.0.0.1", 0, compression=None) as srv:
            port = srv.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", create_connection=BatchConnection, max_queue=16,
                               compression=None) as ws:
                await asyncio.sleep(0.5)  # the reader is busy: the queue fills and reading pauses
                paused = ws._reading_paused
                got, _ = await _drain(ws)
                return paused, got

    paused, got = asyncio.run(main())
    assert paused
    assert got == msgs
