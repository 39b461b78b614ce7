"""Protocols byte for byte (no I/O), and bad input against a running server."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import connect, is_closed, wait_for
from longshore.errors import PackageTooLarge, ProtocolError
from longshore.protocols import FrameProtocol, PackageProtocol, TextProtocol, get_protocol, register_protocol


class FakeConnection:
    """Only what a protocol reads from its connection: the package limit."""

    def __init__(self, max_package_size: int = 1024) -> None:
        self.max_package_size = max_package_size


def feed_in_pieces(protocol, data: bytes, cuts: list[int]) -> list:
    out = []
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
        out.extend(protocol.feed(data[start:cut]))
        start = cut
    return out


def test_text_splits_lines_strips_cr_and_keeps_partials():
    text = TextProtocol(FakeConnection())
    assert text.feed(b"one\r\ntw") == ["one"]
    assert text.buffered() == 2
    assert text.feed(b"o\nthree\n\nfo") == ["two", "three", ""]
    assert text.feed(b"ur\n") == ["four"]
    assert text.encode("hé") == "hé\n".encode()
    assert text.encode(b"raw") == b"raw\n"


def test_text_rejects_long_lines_and_invalid_utf8():
    with pytest.raises(PackageTooLarge):
        TextProtocol(FakeConnection(10)).feed(b"x" * 11)
    with pytest.raises(PackageTooLarge):
        TextProtocol(FakeConnection(10)).feed(b"ok\n" + b"x" * 20 + b"\nok\n")
    assert TextProtocol(FakeConnection(10)).feed(b"x" * 10 + b"\n") == ["x" * 10]
    with pytest.raises(ProtocolError):
        TextProtocol(FakeConnection()).feed(b"\xff\xfe\n")


def test_encode_bytes_like_as_they_are_and_other_values_as_their_text():
    text, frame = TextProtocol(FakeConnection()), FrameProtocol(FakeConnection())
    for value, body in [("été", "été".encode()), (b"\x00\x01", b"\x00\x01"), (bytearray(b"ab"), b"ab"),
                        (memoryview(b"cd"), b"cd"), (5, b"5"), (2.5, b"2.5"), (None, b"None")]:
        assert text.encode(value) == body + b"\n"
        assert frame.encode(value) == (len(body) + 4).to_bytes(4, "big") + body


def test_frame_round_trip_and_errors():
    frame = FrameProtocol(FakeConnection(100))
    wire = frame.encode(b"abc") + frame.encode("hé") + frame.encode(b"")
    assert wire[:4] == (7).to_bytes(4, "big")
    assert frame.feed(wire[:5]) == []
    assert frame.feed(wire[5:]) == [b"abc", "hé".encode(), b""]
    with pytest.raises(PackageTooLarge):
        FrameProtocol(FakeConnection(100)).feed((101).to_bytes(4, "big"))
    with pytest.raises(ProtocolError):
        FrameProtocol(FakeConnection(100)).feed((3).to_bytes(4, "big"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=20), st.lists(st.integers(0, 2000), max_size=30))
def test_frame_any_split_gives_the_same_packages(payloads, cuts):
    wire = b"".join(FrameProtocol(FakeConnection()).encode(p) for p in payloads)
    assert feed_in_pieces(FrameProtocol(FakeConnection()), wire, cuts) == payloads


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30), max_size=20), st.lists(st.integers(0, 2000), max_size=30))
def test_text_any_split_gives_the_same_lines(lines, cuts):
    wire = "".join(line + "\n" for line in lines).encode()
    assert feed_in_pieces(TextProtocol(FakeConnection()), wire, cuts) == lines


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_either_parse_or_raise_protocol_error(data):
    for protocol_class in (TextProtocol, FrameProtocol):
        try:
            protocol_class(FakeConnection(64)).feed(data)
        except ProtocolError:
            pass


class LengthPrefixed(PackageProtocol):
    """A user protocol: 2-byte length, then payload; decoded as uppercase text."""

    scheme = "lp2"

    def input(self, buffer):
        if len(buffer) < 2:
            return 0
        return 2 + int.from_bytes(buffer[:2], "big")

    def decode(self, package):
        return package[2:].decode().upper()

    def encode(self, message):
        data = message.encode()
        return len(data).to_bytes(2, "big") + data


def test_package_protocol_helper():
    protocol = LengthPrefixed(FakeConnection(10))
    assert protocol.feed(b"\x00\x02hi\x00\x03yo") == ["HI"]
    assert protocol.feed(b"u") == ["YOU"]
    with pytest.raises(PackageTooLarge):
        protocol.feed(b"\x00\x20")
    register_protocol("lp2", LengthPrefixed)
    assert get_protocol("lp2") is LengthPrefixed
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("nope")


# -- against a running server -------------------------------------------------------------


def test_oversized_frame_closes_only_that_connection(app_factory):
    app = app_factory(
        """
TcpConnection.default_max_package_size = 1024
w = Worker("frame://127.0.0.1:0", name="frames")
w.on_message = lambda conn, data: conn.send(data)
errors = []
def on_error(conn, code, message):
    with open(os.path.join(os.environ["APP_DIR"], "errors.txt"), "a") as f:
        f.write(f"{code} {message}\\n")
w.on_error = on_error
"""
    ).start()
    port = app.port()
    pid = app.processes()[0]["pid"]
    good = connect(port)
    bad = connect(port)
    bad.sendall((10_000_000).to_bytes(4, "big") + b"x" * 100)
    assert is_closed(bad)
    payload = os.urandom(1000)
    good.sendall((len(payload) + 4).to_bytes(4, "big") + payload)
    answer = b""
    while len(answer) < len(payload) + 4:
        answer += good.recv(65536)
    assert answer[4:] == payload
    wait_for(lambda: app.processes()[0]["package_too_large"] == 1, what="package_too_large counted")
    assert app.processes()[0]["pid"] == pid
    assert (app.folder / "errors.txt").read_text().startswith("4 frame of 10000000 bytes is larger")


def test_garbage_never_kills_a_worker(app_factory):
    app = app_factory(
        """
t = Worker("text://127.0.0.1:0", name="text")
t.on_message = lambda conn, line: conn.send(line)
f = Worker("frame://127.0.0.1:0", name="frame")
f.on_message = lambda conn, data: conn.send(data)
"""
    ).start()
    pids = {p["pid"] for p in app.processes()}
    rng = random.Random(1234)
    for index in (0, 1):
        port = app.port(index)
        for _ in range(30):
            sock = connect(port)
            try:
                sock.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))))
            except OSError:
                pass
            sock.close()
    # Invalid UTF-8 on a text connection is answered by closing it.
    bad = connect(app.port(0))
    bad.sendall(b"\xff\xfe\xfd\n")
    assert is_closed(bad)
    for index, request, expected in ((0, b"fine\n", b"fine\n"), (1, b"\x00\x00\x00\x06ok", b"\x00\x00\x00\x06ok")):
        sock = connect(app.port(index))
        sock.sendall(request)
        data = b""
        while len(data) < len(expected):
            data += sock.recv(100)
        assert data == expected
    assert {p["pid"] for p in app.processes()} == pids
    assert app.status()["exits"] == []


def test_user_protocol_named_in_the_listen_url(app_factory):
    app = app_factory(
        """
from longshore.protocols import PackageProtocol, register_protocol

class Upper(PackageProtocol):
    scheme = "upper"
    def input(self, buffer):
        end = buffer.find(b";")
        return end + 1 if end >= 0 else 0
    def decode(self, package):
        return package[:-1].decode()
    def encode(self, message):
        return message.upper().encode() + b";"

register_protocol("upper", Upper)
w = Worker("upper://127.0.0.1:0", name="upper")
w.on_message = lambda conn, message: conn.send(message)
"""
    ).start()
    sock = connect(app.port())
    sock.sendall(b"abc;de")
    sock.sendall(b"f;")
    data = b""
    while data.count(b";") < 2:
        data += sock.recv(100)
    assert data == b"ABC;DEF;"
