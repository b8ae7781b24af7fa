"""gRPC's HTTP/2 transport (serving/h2grpc.py) where the real clients do not go: flow control on
answers bigger than the window, CONTINUATION frames, padding, protocol errors, many streams on
one connection, limits, deadlines and a graceful shutdown. Against a real server process, with
grpcio as the client or a raw socket speaking hand-built frames."""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import time

import grpc
import numpy as np
import pytest
import requests
from conftest import FEATURES, server
from hpack import Decoder, Encoder

from serving import grpc_predict_v2_pb2 as pb

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBI", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def message(msg) -> bytes:
    body = msg.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def infer_request(x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="churn")
    request.inputs.add(name="input-0", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    return request


class RawClient:
    """One HTTP/2 connection spoken frame by frame."""

    def __init__(
        self, port: int, settings: dict[int, int] | None = None, *, opening: bytes | None = None
    ) -> None:
        """opening: what to send first instead of the preface and SETTINGS."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.buf = b""
        payload = b"".join(struct.pack(">HI", k, v) for k, v in (settings or {}).items())
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, payload) if opening is None else opening)

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def headers_block(self, path: str, **extra: str) -> bytes:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", "localhost"), ("content-type", "application/grpc"),
                   ("te", "trailers"), *extra.items()]  # fmt: skip
        return self.encoder.encode(headers)

    def read(self, timeout: float = 10.0) -> tuple[int, int, int, bytes] | None:
        """The next frame; None when the server closed the connection."""
        self.sock.settimeout(timeout)
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        n = int.from_bytes(self.buf[:3], "big")
        ftype, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big")
        payload, self.buf = self.buf[9 : 9 + n], self.buf[9 + n :]
        return ftype, flags, sid, payload

    def answer(self, sid: int, timeout: float = 10.0, on_data=None) -> dict:
        """Frames until stream sid ends: its headers, trailers, DATA bytes; acks SETTINGS."""
        out = {"headers": [], "data": b"", "frames": [], "rst": None}
        while True:
            got = self.read(timeout)
            assert got is not None, f"connection closed before stream {sid} ended: {out}"
            ftype, flags, fsid, payload = got
            out["frames"].append((ftype, flags, fsid, len(payload)))
            if ftype == SETTINGS and not flags & 1:
                self.send(frame(SETTINGS, 1, 0))
            if fsid != sid:
                continue
            if ftype == HEADERS:
                out["headers"].append(dict(self.decoder.decode(payload)))
            elif ftype == DATA:
                out["data"] += payload
                if on_data is not None:
                    on_data(payload)
            elif ftype == RST_STREAM:
                out["rst"] = int.from_bytes(payload, "big")
                return out
            if flags & END_STREAM:
                return out

    def goaway(self, timeout: float = 10.0) -> tuple[int, int] | None:
        """(last stream id, error code) of the server's GOAWAY; None if it closed without."""
        while True:
            got = self.read(timeout)
            if got is None:
                return None
            ftype, _, _, payload = got
            if ftype == GOAWAY:
                return int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big")

    def closed(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.read(timeout) is None:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def churn(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("grpc-transport")
    proc = server(models["sklearn"], "churn", "3", logs, "--grpc-port", "0", "--max-batch-size",
                  "20000", "--max-body-bytes", str(4 * 1024 * 1024))  # fmt: skip
    proc.start().wait_ready()
    proc.grpc_port = grpc_port_of(proc)
    yield proc
    proc.kill()


def grpc_port_of(proc) -> int:
    import re

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.search(r"listening for gRPC \(OIP v2\) on [\d.]+:(\d+)", proc.log())
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(proc.log())


def predict(models, x: np.ndarray) -> list[int]:
    import pandas as pd

    return models["estimator"].predict(pd.DataFrame(x.astype(np.float64), columns=FEATURES))


def features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.round(rng.normal(size=(n, len(FEATURES))) * 4) / 4).astype(np.float32)


def decode_infer(data: bytes) -> pb.ModelInferResponse:
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5
    return pb.ModelInferResponse.FromString(data[5:])


# --- flow control --------------------------------------------------------------------------------


def test_an_answer_bigger_than_the_window_waits_for_window_updates(churn, models):
    # the client's stream window is 1,000 bytes and its connection window the default 65,535;
    # the answer (8 bytes of INT64 per row) is ~80 kB
    x = features(10_000, seed=1)
    client = RawClient(churn.grpc_port, {0x4: 1000})
    body = message(infer_request(x))
    chunks = [body[i : i + 16_384] for i in range(0, len(body), 16_384)]
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers_block(INFER)))
    client.send(*[frame(DATA, END_STREAM if i == len(chunks) - 1 else 0, 1, c)
                  for i, c in enumerate(chunks)])  # fmt: skip
    received = {"stream": 0, "connection": 0}
    granted = {"stream": 1000, "connection": 65_535}

    def on_data(payload: bytes) -> None:
        received["stream"] += len(payload)
        received["connection"] += len(payload)
        assert len(payload) <= 16_384  # the peer's MAX_FRAME_SIZE
        assert received["stream"] <= granted["stream"], "DATA beyond the stream window"
        assert received["connection"] <= granted["connection"], "beyond the connection window"
        if received["stream"] == granted["stream"]:  # the window is spent: grant 7,000 more
            granted["stream"] += 7000
            client.send(frame(WINDOW_UPDATE, 0, 1, (7000).to_bytes(4, "big")))
        if granted["connection"] - received["connection"] < 16_384:
            granted["connection"] += 65_535
            client.send(frame(WINDOW_UPDATE, 0, 0, (65_535).to_bytes(4, "big")))

    out = client.answer(1, on_data=on_data)
    client.close()
    assert out["headers"][0][":status"] == "200"
    assert out["headers"][-1]["grpc-status"] == "0"
    data_frames = [f for f in out["frames"] if f[0] == DATA and f[2] == 1]
    assert len(data_frames) > 10 and received["stream"] > 65_535
    response = decode_infer(out["data"])
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.int64)
    assert got.tolist() == list(predict(models, x))


def test_grpcio_sends_and_gets_messages_bigger_than_the_windows(churn, models):
    # 3.2 MB in (our stream window is 1 MiB: the server's WINDOW_UPDATEs let it through),
    # 320 kB out (grpcio's windows, BDP probing off)
    x = features(40_000, seed=2)
    with grpc.insecure_channel(
        f"127.0.0.1:{churn.grpc_port}",
        options=[("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", -1)],
    ) as channel:
        call = channel.unary_unary(INFER, pb.ModelInferRequest.SerializeToString,
                                   pb.ModelInferResponse.FromString)  # fmt: skip
        response = call(infer_request(x), timeout=30)
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.int64)
    assert len(response.raw_output_contents[0]) > 65_535
    assert got.tolist() == list(predict(models, x))


# --- frames --------------------------------------------------------------------------------------


def test_a_header_block_in_continuation_frames_and_padded_data_are_read(churn, models):
    client = RawClient(churn.grpc_port)
    block = client.headers_block(INFER, **{"x-filler": "f" * 3000})
    parts = [block[:10], block[10:1000], block[1000:]]
    x = features(3, seed=3)
    body = message(infer_request(x))
    pad = 20
    client.send(
        # HEADERS with priority fields and padding, then two CONTINUATIONs
        frame(HEADERS, PADDED | PRIORITY_FLAG, 1, bytes([4]) + b"\x00\x00\x00\x00\x10" + parts[0]
              + b"\x00" * 4),
        frame(CONTINUATION, 0, 1, parts[1]),
        frame(CONTINUATION, END_HEADERS, 1, parts[2]),
        frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x20"),  # ignored
        frame(DATA, PADDED, 1, bytes([pad]) + body[:7] + b"\x00" * pad),
        frame(DATA, PADDED | END_STREAM, 1, bytes([0]) + body[7:]),
    )  # fmt: skip
    out = client.answer(1)
    assert out["headers"][-1]["grpc-status"] == "0", out
    response = decode_infer(out["data"])
    assert np.frombuffer(response.raw_output_contents[0], np.int64).tolist() == list(
        predict(models, x)
    )
    # and the dynamic table survived: the same block again, now from the server's cache
    client.send(frame(HEADERS, END_HEADERS, 3, client.headers_block(LIVE)),
                frame(DATA, END_STREAM, 3, message(pb.ServerLiveRequest())))  # fmt: skip
    for sid in (5, 7):
        client.send(frame(HEADERS, END_HEADERS, sid, client.headers_block(LIVE)),
                    frame(DATA, END_STREAM, sid, message(pb.ServerLiveRequest())))  # fmt: skip
    for sid in (3, 5, 7):
        out = client.answer(sid)
        assert pb.ServerLiveResponse.FromString(out["data"][5:]).live is True
        assert out["headers"][-1]["grpc-status"] == "0"
    # a PING is answered with its payload
    client.send(frame(PING, 0, 0, b"12345678"))
    while (got := client.read()) is not None and got[0] != PING:
        pass
    assert got[:2] == (PING, 1) and got[3] == b"12345678"
    client.close()


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(DATA, 0, 0, b"x"), 0x1),  # DATA on stream 0: PROTOCOL_ERROR
        (frame(PING, 0, 0, b"1234567"), 0x6),  # PING of 7 bytes: FRAME_SIZE_ERROR
        (frame(HEADERS, END_HEADERS, 2, b"\x82"), 0x1),  # a client opening an even stream
        (frame(CONTINUATION, END_HEADERS, 1, b"\x82"), 0x1),  # CONTINUATION with no HEADERS
        (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), 0x9),  # HPACK garbage
        (frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), 0x1),  # an increment of 0
        (frame(SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), 0x3),  # a window of 2^31
        (frame(DATA, 0, 1, b"\x00" * 17_000), 0x6),  # over MAX_FRAME_SIZE
    ],
)
def test_a_malformed_frame_ends_the_connection_with_goaway_and_others_are_served(churn, bad, code):
    other = RawClient(churn.grpc_port)  # open before, and after: both still served
    client = RawClient(churn.grpc_port)
    client.send(bad)
    assert client.goaway()[1] == code
    assert client.closed()
    client.close()
    other.send(frame(HEADERS, END_HEADERS, 1, other.headers_block(LIVE)),
               frame(DATA, END_STREAM, 1, message(pb.ServerLiveRequest())))  # fmt: skip
    assert other.answer(1)["headers"][-1]["grpc-status"] == "0"
    other.close()
    with grpc.insecure_channel(f"127.0.0.1:{churn.grpc_port}") as channel:
        live = channel.unary_unary(LIVE, pb.ServerLiveRequest.SerializeToString,
                                   pb.ServerLiveResponse.FromString)  # fmt: skip
        assert live(pb.ServerLiveRequest(), timeout=10).live is True


BASE = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", LIVE),
    ("content-type", "application/grpc"),
]


@pytest.mark.parametrize(
    "headers",
    [
        BASE[:2] + BASE[3:],  # no :path
        BASE + [("Content-Length", "5")],  # an uppercase field name
        BASE + [("connection", "keep-alive")],  # connection-specific
        BASE + [("te", "gzip")],
        BASE[:1] + [("user-agent", "x")] + BASE[1:],  # a pseudo-header after a regular field
        BASE + [(":method", "POST")],  # twice
        BASE + [(":status", "200")],
    ],
)
def test_malformed_request_headers_reset_the_stream_and_the_connection_goes_on(churn, headers):
    client = RawClient(churn.grpc_port)
    client.send(frame(HEADERS, END_HEADERS, 1, client.encoder.encode(headers)),
                frame(DATA, END_STREAM, 1, message(pb.ServerLiveRequest())))  # fmt: skip
    assert client.answer(1)["rst"] == 0x1  # PROTOCOL_ERROR, for this stream only
    client.send(frame(HEADERS, END_HEADERS, 3, client.headers_block(LIVE)),
                frame(DATA, END_STREAM, 3, message(pb.ServerLiveRequest())))  # fmt: skip
    assert client.answer(3)["headers"][-1]["grpc-status"] == "0"
    client.close()


def test_the_first_frame_must_be_settings_and_the_preface_exact(churn):
    for opening in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PREFACE + frame(PING, 0, 0, b"1" * 8)):
        client = RawClient(churn.grpc_port, opening=opening)
        assert client.goaway() == (0, 0x1)  # PROTOCOL_ERROR
        assert client.closed()
        client.close()


# --- streams -------------------------------------------------------------------------------------


def test_many_concurrent_streams_on_one_connection_are_answered_and_batched(churn, models):
    def batches() -> tuple[float, float]:
        text = requests.get(churn.url("/metrics"), timeout=5).text
        pick = lambda name: float(  # noqa: E731
            next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))
        )
        return pick("serving_batch_size_sum"), pick("serving_batch_size_count")

    inputs = [features(1, seed=100 + i) for i in range(300)]

    async def run() -> list:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{churn.grpc_port}") as channel:
            call = channel.unary_unary(INFER, pb.ModelInferRequest.SerializeToString,
                                       pb.ModelInferResponse.FromString)  # fmt: skip
            return await asyncio.gather(*(call(infer_request(x), timeout=30) for x in inputs))

    rows_before, calls_before = batches()
    responses = asyncio.run(run())
    rows_after, calls_after = batches()
    for x, response in zip(inputs, responses, strict=True):
        assert np.frombuffer(response.raw_output_contents[0], np.int64).tolist() == list(
            predict(models, x)
        )
    assert rows_after - rows_before == 300
    assert calls_after - calls_before < 300  # some calls shared a predict


def test_streams_beyond_max_concurrent_streams_are_refused(churn):
    client = RawClient(churn.grpc_port)
    block = client.headers_block(LIVE)
    # 1,000 streams left open (no END_STREAM), then one more
    client.send(*[frame(HEADERS, END_HEADERS, 2 * i + 1, block) for i in range(1001)])
    out = client.answer(2001)
    assert out["rst"] == 0x7  # REFUSED_STREAM
    # finishing one of the open streams is still answered
    client.send(frame(DATA, END_STREAM, 1, message(pb.ServerLiveRequest())))
    assert client.answer(1)["headers"][-1]["grpc-status"] == "0"
    client.close()


# --- gRPC errors and limits -------------------------------------------------------------------


def test_grpc_errors_are_trailers_only_with_their_status(churn):
    client = RawClient(churn.grpc_port)
    live = message(pb.ServerLiveRequest())
    cases = {
        1: (client.headers_block("/inference.GRPCInferenceService/Nope"), live),
        3: (client.headers_block(LIVE, **{"grpc-encoding": "gzip"}), b"\x01" + live[1:]),
        5: (client.headers_block(LIVE), b"\x00\x00\x00"),  # a truncated prefix
        7: (client.headers_block(LIVE), b"\x00\x00\x00\x00\x05ab"),  # shorter than declared
    }
    for sid, (block, body) in cases.items():
        client.send(frame(HEADERS, END_HEADERS, sid, block), frame(DATA, END_STREAM, sid, body))
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 11, client.headers_block(LIVE)))
    cases[11] = None  # no message at all
    got = {sid: client.answer(sid) for sid in cases}
    for out in got.values():
        assert len(out["headers"]) == 1 and out["data"] == b""  # trailers-only
        assert out["headers"][0][":status"] == "200"
    status = {sid: out["headers"][0]["grpc-status"] for sid, out in got.items()}
    assert status == {1: "12", 3: "12", 5: "13", 7: "13", 11: "13"}
    # a model error keeps the service's status mapping, message percent-encoded
    request = pb.ModelInferRequest(model_name="ünknown")
    client.send(frame(HEADERS, END_HEADERS, 13, client.headers_block(INFER)),
                frame(DATA, END_STREAM, 13, message(request)))  # fmt: skip
    trailers = client.answer(13)["headers"][0]
    assert trailers["grpc-status"] == "5"  # NOT_FOUND
    assert trailers["x-error-code"] == "model_not_found"
    assert "%C3%BCnknown" in trailers["grpc-message"]
    client.close()


def test_a_message_over_the_limit_is_refused_with_resource_exhausted_before_it_arrives(churn):
    client = RawClient(churn.grpc_port)
    declared = 5 * 1024 * 1024  # over --max-body-bytes (4 MiB)
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers_block(INFER)),
                frame(DATA, 0, 1, b"\x00" + declared.to_bytes(4, "big") + b"\x00" * 100))  # fmt: skip
    out = client.answer(1)
    assert out["headers"][0]["grpc-status"] == "8"
    # the rest of the request is not wanted: the stream is reset with NO_ERROR
    follow = client.read()
    assert follow[0] == RST_STREAM and follow[2] == 1 and follow[3] == b"\x00\x00\x00\x00"
    client.close()
    with grpc.insecure_channel(f"127.0.0.1:{churn.grpc_port}") as channel:
        call = channel.unary_unary(INFER, pb.ModelInferRequest.SerializeToString,
                                   pb.ModelInferResponse.FromString)  # fmt: skip
        with pytest.raises(grpc.RpcError) as raised:
            call(infer_request(np.zeros((60_000, 20), np.float32)), timeout=30)  # 4.8 MB
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_timeout_answers_deadline_exceeded(churn):
    client = RawClient(churn.grpc_port)
    client.send(
        frame(HEADERS, END_HEADERS, 1, client.headers_block(LIVE, **{"grpc-timeout": "200m"}))
    )
    started = time.monotonic()
    out = client.answer(1)  # the request never ends: the deadline does
    assert 0.15 < time.monotonic() - started < 5
    assert out["headers"][0]["grpc-status"] == "4"
    client.close()


# --- shutdown ------------------------------------------------------------------------------------


def test_a_graceful_shutdown_answers_the_calls_in_flight_then_closes(models, tmp_path):
    proc = server(models["sklearn"], "churn", "3", tmp_path, "--grpc-port", "0")
    proc.start().wait_ready()
    try:
        port = grpc_port_of(proc)
        client = RawClient(port)
        x = features(2, seed=5)
        body = message(infer_request(x))
        client.send(frame(HEADERS, END_HEADERS, 1, client.headers_block(INFER)),
                    frame(DATA, 0, 1, body[:10]))  # fmt: skip
        time.sleep(0.2)
        proc.proc.send_signal(signal.SIGTERM)
        assert client.goaway() == (1, 0)  # NO_ERROR; stream 1 is still taken
        # a stream opened after the GOAWAY is not
        client.send(frame(HEADERS, END_HEADERS, 3, client.headers_block(LIVE)),
                    frame(DATA, END_STREAM, 3, message(pb.ServerLiveRequest())))  # fmt: skip
        client.send(frame(DATA, END_STREAM, 1, body[10:]))
        out = client.answer(1)
        assert out["headers"][-1]["grpc-status"] == "0"
        response = decode_infer(out["data"])
        assert np.frombuffer(response.raw_output_contents[0], np.int64).tolist() == list(
            predict(models, x)
        )
        assert client.closed()
        client.close()
        assert proc.proc.wait(timeout=20) == 0
    finally:
        proc.kill()
