"""gRPC's transport for unary calls: the server side of HTTP/2 (RFC 9113) on asyncio, no grpcio.

One `H2Connection` per client connection, on the same event loop as the HTTP/1.1 protocol
(serving/httpserver.py), so gRPC calls meet HTTP requests in the same batches. What it speaks:
the connection preface, SETTINGS (and their ACK), PING (ACK), WINDOW_UPDATE both ways (the
peer's connection and stream windows and MAX_FRAME_SIZE are honoured when writing answers; what
does not fit waits for the peer's next WINDOW_UPDATE), HEADERS + CONTINUATION, DATA with
padding, RST_STREAM, PRIORITY (ignored), GOAWAY (the peer's, and ours on shutdown: the calls
already received are answered, then the connection closes), concurrent streams up to
`MAX_CONCURRENT_STREAMS` (more are refused with REFUSED_STREAM, which clients retry), and a
protocol error ends the connection with GOAWAY and its error code.

HPACK is python-hyper's `hpack` (decoder only). A request's header block that decoded without
touching the dynamic table is cached by its bytes: the same bytes against the same table are
the same headers, and clients repeat their blocks call after call (every header indexed after
the first call). Any change to the table empties the cache. Answers are fixed, pre-encoded
blocks of literals without indexing, so no encoder state is kept.

gRPC's framing: one 5-byte length-prefixed message each way; identity encoding only (a
compressed message is answered UNIMPLEMENTED); a message larger than `max_message_bytes`
is RESOURCE_EXHAUSTED (answered as soon as its length prefix arrives); `grpc-timeout` is
honoured (DEADLINE_EXCEEDED); errors are trailers-only answers. The calls themselves (what
each answers, metrics, batching, the prediction log) are `serving.grpc_server`'s.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hpack import Decoder
from hpack.exceptions import HPACKError

from serving import grpc_server
from serving.grpc_server import CallError, InferenceService
from serving.httpserver import no_delay

if TYPE_CHECKING:
    from serving.app import App

logger = logging.getLogger("serving.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# flags
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# error codes
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384  # what we accept (we do not raise SETTINGS_MAX_FRAME_SIZE)
MAX_CONCURRENT_STREAMS = 1000
STREAM_WINDOW = 1 << 20  # what each stream may send us before our WINDOW_UPDATE
CONNECTION_WINDOW = 1 << 24
MAX_HEADER_LIST = 65_536  # decoded header list, and the encoded block (HEADERS + CONTINUATION)
_HEADER_CACHE_ENTRIES = 64

_FRAME = struct.Struct(">HBBBI")  # 24-bit length as (high 16, low 8), type, flags, stream id
_SETTING = struct.Struct(">HI")
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


class H2ConnectionError(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with this code, then close."""

    def __init__(self, code: int, debug: str) -> None:
        super().__init__(debug)
        self.code = code
        self.debug = debug


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


# --- HPACK: the few literals our answers need ----------------------------------------------------


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, with a literal name (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _literal_indexed_name(index: int, value: bytes) -> bytes:
    return _hpack_int(index, 4) + _hpack_int(len(value), 7) + value


_RESPONSE_HEADERS = (
    b"\x88"  # :status 200 (static table entry 8)
    + _literal_indexed_name(31, b"application/grpc")  # content-type (static name 31)
)
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def percent_encode(message: str) -> bytes:
    """grpc-message as the gRPC spec encodes it: UTF-8, then every byte outside printable
    ASCII, and '%', as %XX."""
    return b"".join(
        bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
        for b in message.encode("utf-8")
    )


def _status_block(status: int, message: str, error_code: str | None) -> bytes:
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", percent_encode(message))
    if error_code:
        block += _literal(b"x-error-code", error_code.encode("ascii", "replace"))
    return block


def _http_status_block(status: int) -> bytes:
    return _literal_indexed_name(8, str(status).encode())  # :status (static name 8)


# --- one stream ------------------------------------------------------------------------------------


class Stream:
    __slots__ = (
        "id", "call", "error", "chunks", "size", "recv_window", "recv_unacked", "send_window",
        "receiving", "answered", "cancelled", "out", "out_pos", "trailers", "deadline",
        "encoding",
    )  # fmt: skip

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.call: tuple[Callable, Any] | None = None
        self.error: bytes | None = None  # a header block to answer with instead of calling
        self.chunks: list[bytes] = []
        self.size = 0
        self.recv_window = STREAM_WINDOW
        self.recv_unacked = 0
        self.send_window = send_window
        self.receiving = True  # the request has not ended (END_STREAM)
        self.answered = False  # our END_STREAM is written or queued
        self.cancelled = False  # reset, or the connection is gone: the answer is dropped
        self.out: memoryview | None = None  # DATA still to send (waiting for a window)
        self.out_pos = 0
        self.trailers = b""
        self.deadline: asyncio.TimerHandle | None = None
        self.encoding: bytes | None = None


# --- one connection --------------------------------------------------------------------------------


class H2Connection(asyncio.Protocol):
    """One client's HTTP/2 connection carrying gRPC unary calls."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.app.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = b""
        self._preface = True  # the client's preface has not arrived yet
        self._first_frame = True  # its first frame must be SETTINGS
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._reading = False  # in data_received, which writes what it answered once done
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.goaway_sent = False
        self.peer_goaway = False
        # what we may send
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME_SIZE
        self.blocked: dict[int, Stream] = {}  # answers waiting for a window, oldest first
        # what the peer may send
        self.recv_window = CONNECTION_WINDOW
        self.recv_unacked = 0
        # a header block arriving in CONTINUATION frames: (stream id, flags, parts, size)
        self._cont: tuple[int, int, list[bytes], int] | None = None
        self.decoder = Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._header_cache: dict[bytes, tuple] = {}
        self._table_state = self._table_snapshot()

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        no_delay(transport)
        self.app.connections.add(self)
        settings = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (S_ENABLE_PUSH, 0),
                (S_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
                (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
            )
        )
        transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))
        )
        if self.app.closing:
            self.close_if_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for stream in self.streams.values():
            self._forget(stream)
        self.streams.clear()
        self.blocked.clear()
        self.app.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        self._reading = True
        try:
            pos = 0
            if self._preface:
                if len(data) < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise H2ConnectionError(PROTOCOL_ERROR, "not the HTTP/2 connection preface")
                    self._buf = data
                    return
                if not data.startswith(PREFACE):
                    raise H2ConnectionError(PROTOCOL_ERROR, "not the HTTP/2 connection preface")
                self._preface = False
                pos = len(PREFACE)
            end = len(data)
            unpack = _FRAME.unpack_from
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(data, pos)
                length = (hi << 8) | lo
                if length > DEFAULT_FRAME_SIZE:
                    raise H2ConnectionError(
                        FRAME_SIZE_ERROR,
                        f"a frame of {length} bytes (at most {DEFAULT_FRAME_SIZE})",
                    )
                stop = pos + 9 + length
                if stop > end:
                    break
                payload = data[pos + 9 : stop]
                pos = stop
                self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
                if self.closed:
                    return
            if pos < end:
                self._buf = data[pos:]
        except H2ConnectionError as exc:
            self._connection_error(exc.code, exc.debug)
            return
        except Exception:  # ours: the connection ends, the server goes on
            logger.exception("gRPC connection failed")
            self._connection_error(INTERNAL_ERROR, "internal error")
            return
        finally:
            self._reading = False
        self._flush()

    # --- frames ----------------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._first_frame:
            if ftype != SETTINGS or flags & ACK:
                raise H2ConnectionError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
            self._first_frame = False
        if self._cont is not None and ftype != CONTINUATION:
            raise H2ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        if ftype == DATA:
            self._on_data(flags, sid, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == PING:
            if sid != 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "PING of other than 8 bytes")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            self._on_rst_stream(sid, payload)
        elif ftype == PRIORITY:
            if sid == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._reset(sid, FRAME_SIZE_ERROR)
        elif ftype == GOAWAY:
            if sid != 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            self.peer_goaway = True
            if not self.streams:
                self._close()
        elif ftype == PUSH_PROMISE:
            raise H2ConnectionError(PROTOCOL_ERROR, "a client cannot push")
        # other frame types are ignored (RFC 9113 4.1)

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2ConnectionError(FRAME_SIZE_ERROR, "SETTINGS of a length not a multiple of 6")
        grew = False
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == S_ENABLE_PUSH:
                if value > 1:
                    raise H2ConnectionError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH other than 0/1")
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ConnectionError(
                        FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too big"
                    )
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2ConnectionError(FLOW_CONTROL_ERROR, "a stream window overflowed")
                grew = grew or delta > 0
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= 16_777_215:
                    raise H2ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            # HEADER_TABLE_SIZE: our answers use no dynamic table, so any size suits them;
            # MAX_CONCURRENT_STREAMS limits pushes (we push none); MAX_HEADER_LIST_SIZE: our
            # answers are small. Unknown settings are ignored.
        self._out.append(frame(SETTINGS, ACK, 0))
        if grew:
            self._pump_blocked()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2ConnectionError(FLOW_CONTROL_ERROR, "the connection window overflowed")
            self._pump_blocked()
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_stream_id:
                raise H2ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # a stream closed since
        if increment == 0:
            self._reset_stream(stream, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset_stream(stream, FLOW_CONTROL_ERROR)
            return
        if stream.out is not None:
            self._pump(stream)

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
        if sid > self.last_stream_id:
            raise H2ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self._forget(stream)
            self._maybe_close()

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start, stop = 0, len(payload)
        if flags & PADDED:
            if not payload:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "PADDED HEADERS without a pad length")
            start, stop = 1, stop - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if stop < start:
            raise H2ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
        block = payload[start:stop] if (start or stop != len(payload)) else payload
        if flags & END_HEADERS:
            self._header_block(sid, flags, block)
        else:
            self._cont = (sid, flags, [block], len(block))

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self._cont is None or self._cont[0] != sid:
            raise H2ConnectionError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        _, first_flags, parts, size = self._cont
        parts.append(payload)
        size += len(payload)
        if size > MAX_HEADER_LIST:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, "a header block over the limit")
        if flags & END_HEADERS:
            self._cont = None
            self._header_block(sid, first_flags, b"".join(parts))
        else:
            self._cont = (sid, first_flags, parts, size)

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        info = self._decode(block)  # always decoded: HPACK's state must follow every block
        stream = self.streams.get(sid)
        if stream is not None:  # trailers of a request: they end it
            if not stream.receiving or not flags & END_STREAM:
                self._reset_stream(stream, PROTOCOL_ERROR)
                return
            self._end_of_request(stream)
            return
        if sid % 2 == 0 or sid <= self.last_stream_id:
            raise H2ConnectionError(PROTOCOL_ERROR, f"HEADERS opening stream {sid} out of order")
        self.last_stream_id = sid
        if self.goaway_sent or self.peer_goaway:
            return  # above the last stream our GOAWAY accepted: ignored (RFC 9113 6.8)
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self._out.append(frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        malformed, method, path, content_type, encoding, timeout = info
        if malformed:  # a stream error (RFC 9113 8.1.1): the connection goes on
            self._out.append(frame(RST_STREAM, 0, sid, PROTOCOL_ERROR.to_bytes(4, "big")))
            return
        stream = Stream(sid, self.peer_initial_window)
        self.streams[sid] = stream
        if method != b"POST":
            stream.error = _http_status_block(405)
        elif content_type is None or not content_type.startswith(b"application/grpc"):
            stream.error = _http_status_block(415)
        else:
            stream.call = self.server.calls.get(path)
            if stream.call is None:
                stream.error = self._trailers_only(
                    grpc_server.UNIMPLEMENTED,
                    f"unknown method {path.decode('latin-1')}",
                    None,
                )
        stream.encoding = encoding
        if timeout is not None:
            stream.deadline = self.loop.call_later(timeout, self._deadline_passed, stream)
        self.app.receiving += 1  # until the request ends (the batcher waits for such requests)
        if flags & END_STREAM:
            self._end_of_request(stream)

    def _decode(self, block: bytes) -> tuple:
        cached = self._header_cache.get(block)
        if cached is not None:
            return cached
        try:
            headers = self.decoder.decode(block, raw=True)
        except (HPACKError, IndexError, ValueError) as exc:
            raise H2ConnectionError(COMPRESSION_ERROR, f"HPACK: {exc}") from None
        method = path = scheme = content_type = encoding = timeout = None
        malformed = regular = False  # RFC 9113 8.2-8.3
        for name, value in headers:
            if name[:1] == b":":
                if regular:
                    malformed = True  # a pseudo-header after a regular field
                if name == b":path":
                    malformed |= path is not None or not value
                    path = value
                elif name == b":method":
                    malformed |= method is not None
                    method = value
                elif name == b":scheme":
                    malformed |= scheme is not None
                    scheme = value
                elif name != b":authority":
                    malformed = True  # :status or an unknown pseudo-header in a request
                continue
            regular = True
            if name == b"content-type":
                content_type = value
            elif name == b"grpc-encoding":
                encoding = value
            elif name == b"grpc-timeout":
                timeout = _parse_timeout(value)
            elif name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
                malformed = True
            elif name != name.lower():
                malformed = True  # field names are lowercase in HTTP/2
        malformed |= method is None or path is None or scheme is None
        info = (malformed, method, path, content_type, encoding, timeout)
        state = self._table_snapshot()
        if state != self._table_state:
            self._table_state = state
            self._header_cache.clear()
        elif timeout is None:  # a grpc-timeout (the time left) differs call by call
            if len(self._header_cache) >= _HEADER_CACHE_ENTRIES:
                self._header_cache.clear()
            self._header_cache[block] = info
        return info

    def _table_snapshot(self) -> tuple:
        table = self.decoder.header_table
        entries = table.dynamic_entries
        # the newest entry itself (held here, so no new entry can be the same object), the
        # number of entries, their size and the table's maximum: any insertion, eviction or
        # size update changes one of them
        return (entries[0] if entries else None, len(entries), table._current_size, table.maxsize)

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)
        self.recv_window -= n
        if self.recv_window < 0:
            raise H2ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_unacked += n
        if self.recv_unacked >= CONNECTION_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, self.recv_unacked.to_bytes(4, "big")))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0
        if flags & PADDED:
            if not payload or payload[0] >= n:
                raise H2ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
            payload = payload[1 : n - payload[0]]
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_stream_id:
                raise H2ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we reset or answered early: what was in flight is dropped
        if not stream.receiving:
            self._reset_stream(stream, STREAM_CLOSED)
            return
        stream.recv_window -= n
        if stream.recv_window < 0:
            self._reset_stream(stream, FLOW_CONTROL_ERROR)
            return
        if payload and not stream.answered:
            stream.chunks.append(payload)
            size = stream.size = stream.size + len(payload)
            limit = self.server.max_message_bytes
            if size > limit + 5 or (size >= 5 and _message_length(stream) > limit):
                self._too_large(stream)
                return
        if flags & END_STREAM:
            self._end_of_request(stream)
            return
        stream.recv_unacked += n
        if stream.recv_unacked >= STREAM_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, sid, stream.recv_unacked.to_bytes(4, "big")))
            stream.recv_window += stream.recv_unacked
            stream.recv_unacked = 0

    # --- calls -----------------------------------------------------------------------------------

    def _end_of_request(self, stream: Stream) -> None:
        self._stop_receiving(stream)
        if stream.answered:
            self._close_stream(stream)
            return
        if stream.error is not None:
            self._answer_block(stream, stream.error)
            return
        body = stream.chunks[0] if len(stream.chunks) == 1 else b"".join(stream.chunks)
        stream.chunks = []
        if len(body) < 5:
            self._fail_call(stream, grpc_server.INTERNAL, "the request has no message")
            return
        compressed = body[0]
        length = int.from_bytes(body[1:5], "big")
        if compressed:
            if compressed != 1 or stream.encoding in (None, b"identity"):
                self._fail_call(stream, grpc_server.INTERNAL, "a bad compressed-flag byte")
            else:
                self._fail_call(
                    stream,
                    grpc_server.UNIMPLEMENTED,
                    f"grpc-encoding {stream.encoding.decode('latin-1')} is not supported "
                    "(identity only)",
                )
            return
        if 5 + length != len(body):
            self._fail_call(stream, grpc_server.INTERNAL, "a unary call takes one message")
            return
        fn, message = stream.call
        try:
            request = message.FromString(body[5:])
        except Exception:
            self._fail_call(stream, grpc_server.INTERNAL, "the request message does not parse")
            return
        try:
            fn(request, lambda result: self._reply(stream, result))
        except Exception:  # the calls catch the model's failures: this is ours
            logger.exception("gRPC call failed")
            self._reply(stream, CallError(grpc_server.INTERNAL, "internal error", "internal_error"))

    def _reply(self, stream: Stream, result: Any) -> None:
        """A call's answer: its response message (or the message serialized), or a
        CallError."""
        if not self._answerable(stream):
            return  # reset, timed out or lost with its connection: dropped
        if isinstance(result, CallError):
            self._fail_call(stream, result.status, result.message, result.error_code)
        else:
            try:
                body = result if isinstance(result, bytes) else result.SerializeToString()
            except Exception:  # ours; raised here it would stop a whole batch's answers
                logger.exception("gRPC answer failed")
                self._fail_call(stream, grpc_server.INTERNAL, "internal error", "internal_error")
            else:
                self._answer(stream, b"\x00" + len(body).to_bytes(4, "big") + body)
        if self._reading:
            return  # answered while its request was read: data_received writes it
        if self.streams:
            self._schedule_flush()  # other answers may follow in this loop turn: one write
        else:
            self._flush()

    def _answerable(self, stream: Stream) -> bool:
        """False when the stream was reset, timed out or lost with its connection."""
        return not (stream.cancelled or stream.answered or self.closed)

    def _deadline_passed(self, stream: Stream) -> None:
        stream.deadline = None
        if not stream.answered and not stream.cancelled and not self.closed:
            self._fail_call(stream, grpc_server.DEADLINE_EXCEEDED, "the deadline passed")
            self._flush()

    def _too_large(self, stream: Stream) -> None:
        stream.chunks = []
        self._fail_call(
            stream,
            grpc_server.RESOURCE_EXHAUSTED,
            f"the request message is larger than {self.server.max_message_bytes} bytes",
            "request_too_large",
        )

    def _fail_call(
        self, stream: Stream, status: int, message: str, error_code: str | None = None
    ) -> None:
        self._answer_block(stream, self._trailers_only(status, message, error_code))

    def _trailers_only(self, status: int, message: str, error_code: str | None) -> bytes:
        return _RESPONSE_HEADERS + _status_block(status, message, error_code)

    # --- writing answers -------------------------------------------------------------------------

    def _answer_block(self, stream: Stream, block: bytes) -> None:
        """A whole answer in one header block (trailers-only, or an HTTP error status)."""
        stream.answered = True
        self._headers(stream.id, block, END_STREAM)
        self._close_stream(stream)

    def _answer(self, stream: Stream, message: bytes) -> None:
        stream.answered = True
        n = len(message)
        if n <= self.send_window and n <= stream.send_window and n <= self.peer_max_frame:
            # the whole answer fits the windows and one DATA frame (the common case): its
            # three frames as one piece, as _pump would write them
            sid = stream.id
            self._out.append(
                _FRAME.pack(0, len(_RESPONSE_HEADERS), HEADERS, END_HEADERS, sid)
                + _RESPONSE_HEADERS
                + _FRAME.pack(n >> 8, n & 0xFF, DATA, 0, sid)
                + message
                + _FRAME.pack(0, len(_OK_TRAILERS), HEADERS, END_STREAM | END_HEADERS, sid)
                + _OK_TRAILERS
            )
            self.send_window -= n
            stream.send_window -= n
            self._close_stream(stream)
            return
        self._headers(stream.id, _RESPONSE_HEADERS, 0)
        stream.out = memoryview(message)
        stream.out_pos = 0
        stream.trailers = _OK_TRAILERS
        self._pump(stream)

    def _headers(self, sid: int, block: bytes, flags: int) -> None:
        limit = self.peer_max_frame
        if len(block) <= limit:
            self._out.append(frame(HEADERS, flags | END_HEADERS, sid, block))
            return
        parts = [block[i : i + limit] for i in range(0, len(block), limit)]
        self._out.append(frame(HEADERS, flags, sid, parts[0]))
        for part in parts[1:-1]:
            self._out.append(frame(CONTINUATION, 0, sid, part))
        self._out.append(frame(CONTINUATION, END_HEADERS, sid, parts[-1]))

    def _pump(self, stream: Stream) -> None:
        """Send what the windows allow of the stream's DATA; the trailers once it is all sent."""
        out, pos, total = stream.out, stream.out_pos, len(stream.out)
        while pos < total:
            room = min(self.send_window, stream.send_window, self.peer_max_frame, total - pos)
            if room <= 0:
                stream.out_pos = pos
                self.blocked[stream.id] = stream
                return
            self._out.append(frame(DATA, 0, stream.id, bytes(out[pos : pos + room])))
            pos += room
            self.send_window -= room
            stream.send_window -= room
        stream.out = None
        self.blocked.pop(stream.id, None)
        self._headers(stream.id, stream.trailers, END_STREAM)
        self._close_stream(stream)

    def _pump_blocked(self) -> None:
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            if stream.send_window > 0:
                self._pump(stream)

    # --- stream and connection ends --------------------------------------------------------------

    def _stop_receiving(self, stream: Stream) -> None:
        if stream.receiving:
            stream.receiving = False
            self.app.receiving -= 1

    def _close_stream(self, stream: Stream) -> None:
        """Our answer is out: the stream closes (reset with NO_ERROR when the request had not
        ended, RFC 9113 8.1: the rest of it is not needed)."""
        if stream.out is not None:
            return  # still sending
        if stream.receiving:
            self._stop_receiving(stream)
            self._out.append(frame(RST_STREAM, 0, stream.id, NO_ERROR.to_bytes(4, "big")))
        if self.streams.pop(stream.id, None) is not None:
            if stream.deadline is not None:
                stream.deadline.cancel()
                stream.deadline = None
        self._maybe_close()

    def _reset(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            self._reset_stream(stream, code)
        else:
            self._out.append(frame(RST_STREAM, 0, sid, code.to_bytes(4, "big")))

    def _reset_stream(self, stream: Stream, code: int) -> None:
        self._out.append(frame(RST_STREAM, 0, stream.id, code.to_bytes(4, "big")))
        self.streams.pop(stream.id, None)
        self._forget(stream)
        self._maybe_close()

    def _forget(self, stream: Stream) -> None:
        """The stream is gone without an answer: its call's result will be dropped."""
        stream.cancelled = True
        stream.out = None
        self.blocked.pop(stream.id, None)
        if stream.receiving:
            stream.receiving = False
            self.app.receiving -= 1
        if stream.deadline is not None:
            stream.deadline.cancel()
            stream.deadline = None

    def _maybe_close(self) -> None:
        if not self.streams and (self.goaway_sent or self.peer_goaway):
            self._close()

    def _connection_error(self, code: int, debug: str) -> None:
        logger.info("gRPC connection error %#x: %s", code, debug)
        self._out.append(
            frame(
                GOAWAY,
                0,
                0,
                self.last_stream_id.to_bytes(4, "big")
                + code.to_bytes(4, "big")
                + debug.encode()[:256],
            )
        )
        self.goaway_sent = True
        for stream in self.streams.values():
            self._forget(stream)
        self.streams.clear()
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self._flush()
        self.closed = True
        self.transport.close()  # after what is buffered is written

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed:
            out = self._out
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    # --- shutdown (App.begin_shutdown) ---------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.streams

    def close_if_idle(self) -> None:
        """Graceful shutdown: GOAWAY (the streams received so far are answered), then close
        once they are."""
        if self.closed:
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            self._out.append(
                frame(GOAWAY, 0, 0, self.last_stream_id.to_bytes(4, "big") + b"\x00\x00\x00\x00")
            )
            self._flush()
        self._maybe_close()


def _message_length(stream: Stream) -> int:
    head = stream.chunks[0] if len(stream.chunks[0]) >= 5 else b"".join(stream.chunks)
    return int.from_bytes(head[1:5], "big")


def _parse_timeout(value: bytes) -> float | None:
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None  # a malformed timeout is no timeout
    return int(digits) * unit


class GrpcServer:
    """The listener's shared state: the App, its calls by path, the message size limit."""

    def __init__(self, app: App, max_message_bytes: int) -> None:
        self.app = app
        self.max_message_bytes = max_message_bytes
        self.calls = grpc_server.calls(InferenceService(app))

    def protocol(self) -> H2Connection:
        return H2Connection(self)


async def start(app: App, host: str, port: int, max_message_bytes: int) -> tuple[Any, int]:
    """Listen on host:port (0: a free port) with SO_REUSEPORT (each worker process listens on
    the port); returns (asyncio server, port). Raises RuntimeError when it cannot be bound."""
    from serving.httpserver import make_reuseport_socket

    try:
        sock = make_reuseport_socket(host, port)
    except OSError as exc:
        raise RuntimeError(str(exc)) from None
    grpc = GrpcServer(app, max_message_bytes)
    server = await app.loop.create_server(grpc.protocol, sock=sock)
    return server, sock.getsockname()[1]
