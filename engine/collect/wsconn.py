"""A websockets client connection that hands received messages to the reader in batches.

The stock `async for message in ws` costs a Future, a task wake-up and a dozen Python calls per
message (websockets' Assembler); at tens of thousands of messages a second a collector spent more
time there than in its normalizer. `BatchConnection` (passed as `connect(create_connection=...)`)
keeps everything else of the stock connection: handshake, headers, ping/pong, close codes,
`max_size`, `send`, `close`. Only the delivery of data messages changes: the messages of one socket
read form one batch stamped with the time of that read, and `take()` returns every batch not taken
yet, oldest first, waiting for one when there is none. Nothing is dropped or reordered; reading is
paused while more than `max_queue` messages wait (as the stock flow control does).

`tick_s` (set by the reader, 0 = off): after each socket read, reading pauses for that long, so a
steady feed is read in a few large reads a tick instead of one small read per message (each read
costs a wake-up of the loop and of the reader). Messages then wait in the kernel's socket buffer
for at most `tick_s`; their receive time is that of the read that got them, as always.

Text messages are decoded from UTF-8 like the stock `recv()`; invalid UTF-8 fails the connection
with close code 1007 exactly as there, after the messages before it have been taken.

Framing: websockets parses every frame with generator-based Python (a few microseconds a frame). While
the connection is open and that parser waits at a frame boundary, frames are cut out of each read
here, in order: unfragmented, unmasked, uncompressed text and binary frames (the whole of a market
feed) are delivered directly; any other frame (ping, pong, close, a fragment, extension bits) is
handed whole to the stock parser, which handles it as always and is at a boundary again after it; a
frame the stock parser refuses at its header (masked, over `max_size`) goes to it with the rest of the
read, and the stock path keeps the stream until it waits at a boundary again. A frame cut short at
the end of a read waits here for the rest.
"""

from __future__ import annotations

import asyncio
import time

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.connection import Connection
from websockets.frames import BINARY, CONT, TEXT, CloseCode
from websockets.protocol import OPEN
from websockets.streams import StreamReader

_AT_EOF = StreamReader.at_eof.__code__  # where the stock parser waits for the next frame
Batch = tuple[int, list]  # (recv_ns of the socket read, messages: str for text, bytes for binary)


class BatchConnection(ClientConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batches: list[Batch] = []  # socket reads not taken yet, oldest first
        self._pending = 0  # messages in _batches
        self._read_ns = 0  # time of the socket read being parsed
        self._frags: list | None = None  # fragments of a message in progress
        self._frag_text = False
        self._bad: UnicodeDecodeError | None = None  # invalid UTF-8: the connection fails after what came before
        self._wake: asyncio.Future | None = None
        self._full = False  # more than max_queue messages wait: reading paused until taken
        self._tick: asyncio.TimerHandle | None = None  # reading paused until the tick is over
        self._reading_paused = False
        self.tick_s = 0.0
        self.messages = 0  # delivered since the connection opened
        self._rest = b""  # start of a frame cut short by the end of a read (fast path only)
        self.fast_frames = 0  # frames cut out here rather than by the stock parser

    # ---- event loop side (protocol callbacks) ---------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._read_ns = time.time_ns()
        if self._rest or self._stock_at_boundary():
            self._fast(self._rest + data if self._rest else data)
        else:
            Connection.data_received(self, data)
        if self.tick_s and self._tick is None and self.response is not None:
            self._tick = self.loop.call_later(self.tick_s, self._tick_over)
            self._reading()

    def _stock_at_boundary(self) -> bool:
        """Whether the stock parser waits for the first byte of a frame of an open connection (it
        is suspended in `StreamReader.at_eof` with nothing buffered)."""
        p = self.protocol
        if self.response is None or p.state is not OPEN or p.current_size is not None or p.reader.buffer:
            return False
        g = p.parser
        for _ in range(4):  # ClientProtocol.parse -> Protocol.parse -> StreamReader.at_eof
            sub = getattr(g, "gi_yieldfrom", None)
            if sub is None:
                return getattr(g, "gi_code", None) is _AT_EOF
            g = sub
        return False

    def _fast(self, buf: bytes) -> None:
        """Frames from the front of `buf`, the stock parser being at a frame boundary: simple data
        frames delivered here (all of one read in one go: one batch append and one wake-up), any
        other frame handed to the stock parser whole (so it is at a boundary again after it; what
        was cut out before it is delivered first), a frame cut short kept for the next read."""
        p = self.protocol
        limit = p.max_message_size
        i, n = 0, len(buf)
        msgs: list = []
        try:
            with memoryview(buf) as mv:
                while n - i >= 2:
                    if p.state is not OPEN or self._bad is not None:
                        break  # closing or failing: the stock parser has the rest
                    b0, b1 = buf[i], buf[i + 1]
                    ln, h = b1 & 0x7F, 2
                    if ln >= 126:
                        h = 4 if ln == 126 else 10
                        if n - i < h:
                            self._rest = buf[i:]
                            return
                        ln = int.from_bytes(buf[i + 2:i + h], "big")
                    if b1 & 0x80 or (limit is not None and ln > limit):
                        break  # masked or too big: refused by the stock parser at its header (1002, 1009)
                    end = i + h + ln
                    if end > n:
                        self._rest = buf[i:]
                        return
                    if b0 == 0x81 and p.current_size is None:
                        try:
                            msgs.append(str(mv[i + h:end], "utf-8"))
                        except UnicodeDecodeError as e:  # nothing after it is delivered
                            self._bad = e
                    elif b0 == 0x82 and p.current_size is None:
                        msgs.append(bytes(mv[i + h:end]))
                    else:  # ping, pong, close, a fragment, extension bits: one whole frame to the stock parser
                        self._deliver_all(msgs)
                        msgs = []
                        Connection.data_received(self, bytes(mv[i:end]))
                    i = end
            self._rest = b""
            if i < n:
                rest = buf[i:]
                if n - i < 2 and p.state is OPEN and self._bad is None:
                    self._rest = rest  # one byte of the next frame
                else:
                    self._deliver_all(msgs)
                    msgs = []
                    Connection.data_received(self, rest)
        finally:
            self._deliver_all(msgs)
            if self._bad is not None:
                self._wakeup()

    def _deliver_all(self, msgs: list) -> None:
        """Whole messages cut out of the current read into its batch, in order."""
        if not msgs:
            return
        k = len(msgs)
        self.fast_frames += k
        b = self._batches
        if b and b[-1][0] == self._read_ns:
            b[-1][1].extend(msgs)
        else:
            b.append((self._read_ns, msgs))
        self._pending += k
        self.messages += k
        if self.max_queue_high is not None and self._pending > self.max_queue_high and not self._full:
            self._full = True
            self._reading()
        self._wakeup()

    def _tick_over(self) -> None:
        self._tick = None
        self._reading()

    def _reading(self) -> None:
        """Pause or resume reading the socket as the tick and the queue of messages require."""
        pause = self._full or self._tick is not None
        if pause != self._reading_paused and not self.transport.is_closing():
            self._reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def process_event(self, event) -> None:
        if self.response is None or event.opcode not in (TEXT, BINARY, CONT):
            super().process_event(event)  # the handshake response; pings and pongs
            return
        if self._bad is not None:
            return  # the connection is failing: nothing after the bad message is delivered
        op = event.opcode
        if op is CONT:
            self._frags.append(event.data)  # the protocol refuses a CONT without a first fragment
            if not event.fin:
                return
            data, text, self._frags = b"".join(self._frags), self._frag_text, None
        elif not event.fin:
            self._frags, self._frag_text = [event.data], op is TEXT
            return
        else:
            data, text = event.data, op is TEXT
        self._deliver(data, text)

    def _deliver(self, data, text: bool) -> None:
        """One whole message into the current read's batch."""
        if text:
            try:
                msg = str(data, "utf-8")
            except UnicodeDecodeError as e:
                self._bad = e
                self._wakeup()
                return
        else:
            msg = bytes(data)
        b = self._batches
        if b and b[-1][0] == self._read_ns:
            b[-1][1].append(msg)
        else:
            b.append((self._read_ns, [msg]))
        self._pending += 1
        self.messages += 1
        if self.max_queue_high is not None and self._pending > self.max_queue_high and not self._full:
            self._full = True
            self._reading()
        self._wakeup()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._wakeup()

    def _wakeup(self) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    # ---- reader side ----------------------------------------------------------------------------
    async def take(self) -> list[Batch]:
        """Every batch received and not taken yet, oldest first; waits until there is one. Raises
        `ConnectionClosed` (like `recv()`) once the connection is closed and all it delivered is taken."""
        while not self._batches:
            if self._bad is not None:
                e = self._bad
                self.set_connection_exc(e)
                async with self.send_context():
                    self.protocol.fail(CloseCode.INVALID_DATA, f"{e.reason} at position {e.start}")
                break
            if self.connection_lost_waiter.done():
                break
            self._wake = self.loop.create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        if not self._batches:
            await asyncio.shield(self.connection_lost_waiter)
            raise self.close_exc
        out, self._batches, self._pending = self._batches, [], 0
        if self._full:
            self._full = False
            self._reading()
        return out
