"""The WebSocket protocol without a network: bytes in, messages and bytes out."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longshore.connection.tcp import ESTABLISHED
from longshore.errors import PackageTooLarge, ProtocolError
from longshore.protocols.websocket import WebSocketProtocol, accept_key, apply_mask, close_payload, negotiate_deflate, parse_extensions
from wsutil import frame


class Recorder:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Settings:
    websocket_ping_interval = None
    websocket_idle_timeout = None


class Connection:
    """What the protocol uses of its connection, recording what it writes."""

    max_package_size = 1000
    closed = False
    _state = None
    bytes_written = 0

    def __init__(self) -> None:
        self.worker = Settings()
        self.transport = Recorder()
        self.sent: list[bytes] = []

    def send(self, data: bytes, raw: bool = False) -> bool:
        self.sent.append(data)
        return True

    def _flush_cork(self) -> None:
        pass


def opened(extra: str = "") -> tuple[WebSocketProtocol, Connection]:
    connection = Connection()
    protocol = WebSocketProtocol(connection)
    request = (
        "GET /chat?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()
    assert protocol.feed(request) == []
    return protocol, connection


def test_handshake_answer_is_byte_exact():
    protocol, connection = opened()
    assert connection.transport.written == [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    ]
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
    assert protocol.request.path == "/chat" and protocol.request.query["x"] == "1"


def test_encoding_is_byte_exact():
    protocol, _ = opened()
    assert protocol.encode("Hello") == b"\x81\x05Hello"  # RFC 6455 5.7
    assert protocol.encode(b"\x01\x02") == b"\x82\x02\x01\x02"
    assert protocol.encode("x" * 256)[:4] == b"\x81\x7e\x01\x00"
    assert protocol.encode(b"x" * 65536)[:10] == b"\x82\x7f" + (65536).to_bytes(8, "big")


def test_rfc_examples_decode():
    protocol, connection = opened()
    # RFC 6455 5.7: a masked "Hello", and a fragmented unmasked one is refused from a client.
    assert protocol.feed(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58") == ["Hello"]
    assert protocol.feed(frame(9, b"Hello")) == []
    assert connection.sent == [b"\x8a\x05Hello"]  # the pong


def test_masking_round_trip():
    for size in (0, 1, 3, 4, 5, 125, 126, 1000, 70000):
        payload = os.urandom(size)
        key = os.urandom(4)
        assert apply_mask(apply_mask(payload, key), key) == payload
        assert apply_mask(payload, key) == bytes(b ^ key[i % 4] for i, b in enumerate(payload))


messages = st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=300)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(messages, st.data())
def test_any_split_of_a_frame_stream_gives_the_same_messages(items, data):
    stream = b""
    for item in items:
        payload = item.encode() if isinstance(item, str) else item
        opcode = 1 if isinstance(item, str) else 2
        pieces = data.draw(st.integers(1, 3))
        if pieces == 1 or len(payload) < 2:
            stream += frame(opcode, payload)
        else:
            cut = len(payload) // 2
            stream += frame(opcode, payload[:cut], fin=False) + frame(9, b"p") + frame(0, payload[cut:])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    protocol, _ = opened()
    received = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        received += protocol.feed(stream[previous:cut])
        previous = cut
    assert received == items


@pytest.mark.parametrize(
    "data, error, code",
    [
        (frame(1, b"hi", mask=False), ProtocolError, 1002),
        (frame(1, b"\xc3\x28"), ProtocolError, 1007),
        (frame(1, b"\xed\xa0\x80"), ProtocolError, 1007),  # a UTF-16 surrogate
        (frame(2, b"x" * 1001), PackageTooLarge, 1009),
        (frame(2, b"", length=5000)[:4], PackageTooLarge, 1009),
        (frame(0xB, b""), ProtocolError, 1002),
        (frame(8, b"\x03\xe8\xff"), ProtocolError, 1007),
        (frame(8, (999).to_bytes(2, "big")), ProtocolError, 1002),
        (frame(8, (5000).to_bytes(2, "big")), ProtocolError, 1002),
    ],
)
def test_bad_input_raises_with_a_close_frame(data, error, code):
    protocol, _ = opened()
    with pytest.raises(error) as raised:
        protocol.feed(data)
    response = raised.value.response
    assert response[0] == 0x88 and int.from_bytes(response[2:4], "big") == code


def test_valid_close_is_echoed():
    protocol, connection = opened()
    connection._state = ESTABLISHED
    closed = []
    connection.close = lambda: closed.append(True)  # type: ignore[attr-defined]
    assert protocol.feed(frame(8, (4000).to_bytes(2, "big") + "é".encode())) == []
    assert protocol.close_code == 4000 and protocol.close_reason == "é"
    assert connection.transport.written[-1] == b"\x88\x02" + (4000).to_bytes(2, "big")
    assert closed == [True]


def test_deflate_negotiation():
    assert negotiate_deflate("permessage-deflate; client_max_window_bits") == ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15)
    assert negotiate_deflate("permessage-deflate; server_max_window_bits=10")[1] == 10
    assert negotiate_deflate("permessage-deflate; server_max_window_bits=8") is None
    assert negotiate_deflate("permessage-deflate; unknown_param") is None
    assert negotiate_deflate("x-webkit-deflate-frame, permessage-deflate")[1] == 15
    assert parse_extensions('a; b="1", c') == [("a", {"b": "1"}), ("c", {})]


def test_deflate_round_trip_and_bomb():
    protocol, connection = opened("Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert b"permessage-deflate" in connection.transport.written[0]
    text = "compressible " * 50
    encoded = protocol.encode(text)
    assert encoded[0] == 0xC1 and len(encoded) < len(text)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert protocol.feed(frame(1, body[:-4], rsv=0x40)) == [text]
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = bomb.compress(b"\0" * 100_000) + bomb.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(PackageTooLarge):
        protocol.feed(frame(2, body[:-4], rsv=0x40))


def test_a_large_message_in_many_chunks_is_not_copied_over_and_over():
    import time

    protocol, connection = opened()
    connection.max_package_size = 20 * 1024 * 1024
    payload = os.urandom(8 * 1024 * 1024)
    data = frame(2, payload) + frame(1, b"next")
    started = time.perf_counter()
    received = []
    for start in range(0, len(data), 65536):
        received += protocol.feed(data[start : start + 65536])
    assert received == [payload, "next"]
    assert time.perf_counter() - started < 2.0


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_a_handshake_in_pieces_then_frames_in_the_same_chunk():
    connection = Connection()
    protocol = WebSocketProtocol(connection)
    for byte in HANDSHAKE[:-1]:
        assert protocol.feed(bytes((byte,))) == []
    assert connection.transport.written == []
    assert protocol.feed(HANDSHAKE[-1:] + frame(1, b"first") + frame(2, b"second")) == ["first", b"second"]
    assert connection.transport.written[0].startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize(
    "data, status",
    [
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 17000, b"431"),  # no end of the head within max_header_size
        (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", b"400"),
        (b"NOT HTTP\r\n\r\n", b"400"),
    ],
)
def test_a_bad_handshake_head_is_answered_with_an_http_error(data, status):
    protocol = WebSocketProtocol(Connection())
    with pytest.raises(ProtocolError) as raised:
        protocol.feed(data)
    assert raised.value.response.split(b" ")[1] == status


def test_the_worker_setting_of_max_header_size_applies():
    connection = Connection()
    connection.worker.websocket_max_header_size = 100
    protocol = WebSocketProtocol(connection)
    with pytest.raises(ProtocolError) as raised:
        protocol.feed(HANDSHAKE[:60] + b"X-Long: " + b"a" * 60)
    assert b" 431 " in raised.value.response


def test_a_whole_handshake_over_max_header_size_in_one_chunk_is_refused():
    protocol = WebSocketProtocol(Connection())
    with pytest.raises(ProtocolError) as raised:
        protocol.feed(HANDSHAKE[:-2] + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert b" 431 " in raised.value.response


def test_a_small_whole_frame_over_max_package_size_is_refused():
    protocol, connection = opened()
    connection.max_package_size = 50
    assert protocol.feed(frame(2, b"y" * 50)) == [b"y" * 50]
    with pytest.raises(PackageTooLarge):
        protocol.feed(frame(2, b"y" * 51))


def test_control_frames_between_fragments_do_not_count_toward_the_message_size():
    protocol, connection = opened()  # max_package_size 1000
    data = frame(2, b"a" * 990, fin=False) + frame(9, b"p" * 20) + frame(0, b"b" * 10)
    assert protocol.feed(data) == [b"a" * 990 + b"b" * 10]
    assert connection.sent == [b"\x8a\x14" + b"p" * 20]


@pytest.mark.parametrize(
    "header",
    [
        frame(9, b"", length=900)[:8],  # a ping longer than 125 bytes
        frame(8, b"", fin=False, length=10)[:6],  # a fragmented close
        frame(3, b"", length=900)[:8],  # an unknown opcode
        frame(0xB, b"", length=10)[:6],  # an unknown control opcode
        frame(1, b"", rsv=0x20, length=900)[:8],  # reserved bits
        frame(0, b"", length=900)[:8],  # a continuation of nothing
    ],
    ids=["long ping", "fragmented close", "unknown opcode", "unknown control opcode", "reserved bits", "orphan continuation"],
)
def test_a_bad_frame_header_is_refused_before_its_payload_arrives(header):
    protocol, _ = opened()
    with pytest.raises(ProtocolError) as raised:
        protocol.feed(header)
    assert int.from_bytes(raised.value.response[2:4], "big") == 1002


def test_a_long_close_reason_is_cut_on_a_character_boundary():
    assert close_payload(4000, "é" * 100) == (4000).to_bytes(2, "big") + "é".encode() * 61
    assert close_payload(1000, "x" * 200) == (1000).to_bytes(2, "big") + b"x" * 123
    assert close_payload(1005, "ignored") == b""


def test_a_close_code_that_may_not_be_sent_is_refused_before_anything_changes():
    protocol, connection = opened()
    connection._state = ESTABLISHED
    written = len(connection.transport.written)
    for code in (1005, 1006, 1015, 1004, 999, 1016, 2999, 5000):
        with pytest.raises(ValueError):
            protocol.close(code)
    assert protocol.open and len(connection.transport.written) == written
    protocol.close(4999, "last")
    assert not protocol.open and connection.transport.written[-1] == b"\x88\x06" + (4999).to_bytes(2, "big") + b"last"


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_after_a_too_large_frame_only_the_peers_close_frame_is_looked_for(data):
    protocol, connection = opened()  # max_package_size 1000
    big = frame(2, b"x" * 5000)
    with pytest.raises(PackageTooLarge):
        protocol.feed(big[:700])  # refused on its header; the rest of it is still coming
    after = big[700:] + frame(1, b"dropped") + frame(9, b"not answered") + frame(2, b"y" * 70_000)
    after += frame(8, (1000).to_bytes(2, "big") + b"bye") + frame(1, b"never read")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(after)), max_size=8)))
    previous = 0
    for cut in [*cuts, len(after)]:
        protocol.drain(after[previous:cut])
        previous = cut
        if connection.transport.closed:
            break
    assert connection.transport.closed  # at the close frame, not before
    assert previous >= len(after) - len(frame(1, b"never read"))
    assert (protocol.close_code, protocol.close_reason) == (1000, "bye")
    assert connection.sent == []  # no pong, nothing else sent
