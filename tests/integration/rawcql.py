"""A CQL client that sends exactly the bytes it is given: for hostile clients in tests. Written
from the native protocol v4 spec, sharing nothing with the proxy or the emulator."""
import socket
import struct

QUERY, PREPARE, EXECUTE, BATCH, REGISTER, OPTIONS = 0x07, 0x09, 0x0A, 0x0D, 0x0B, 0x05
STARTUP, AUTH_RESPONSE = 0x01, 0x0F
ERROR, READY, AUTHENTICATE, RESULT, AUTH_SUCCESS = 0x00, 0x02, 0x03, 0x08, 0x10
PROTOCOL_ERROR, INVALID = 0x000A, 0x2200
ONE, LOCAL_QUORUM = 0x0001, 0x0006


class Closed(Exception):
    """The server closed the connection."""


def frame(stream, opcode, body, flags=0, version=4):
    return struct.pack(">BBhBi", version, flags, stream, opcode, len(body)) + body


def string(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def long_string(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">i", len(b)) + b


def query(text, cl=ONE, flags=0, tail=b""):
    return long_string(text) + struct.pack(">HB", cl, flags) + tail


def execute(statement_id, cl=ONE, flags=0, tail=b""):
    return string(statement_id) + struct.pack(">HB", cl, flags) + tail


def batch(entries, cl=LOCAL_QUORUM, flags=0, kind=1, tail=b""):
    """entries: (text or id bytes, [values]) — str is a query, bytes a prepared id."""
    body = struct.pack(">BH", kind, len(entries))
    for stmt, values in entries:
        body += (b"\x00" + long_string(stmt)) if isinstance(stmt, str) else (b"\x01" + string(stmt))
        body += struct.pack(">H", len(values))
        for v in values:
            body += struct.pack(">i", len(v)) + v
    return body + struct.pack(">HB", cl, flags) + tail


class RawClient:
    def __init__(self, port, timeout=20):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise Closed(str(e)) from e

    def _fill(self, n):
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError as e:
                raise Closed(str(e)) from e
            if not chunk:
                raise Closed("closed by the server")
            self.buf += chunk

    def read(self):
        """(flags, stream, opcode, body) of the next frame; Closed if the server hung up."""
        self._fill(9)
        _, flags, stream, opcode, length = struct.unpack(">BBhBi", self.buf[:9])
        self._fill(9 + length)
        body, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
        return flags, stream, opcode, body

    def answer(self, stream):
        """The answer on `stream` (skipping events and other streams' answers)."""
        while True:
            flags, got, opcode, body = self.read()
            if got == stream:
                return flags, opcode, body

    def call(self, stream, opcode, body, flags=0):
        self.send(frame(stream, opcode, body, flags))
        return self.answer(stream)

    def handshake(self, user=None, password=None):
        startup = struct.pack(">H", 1) + string("CQL_VERSION") + string("3.0.0")
        _, op, _ = self.call(0, STARTUP, startup)
        if op == AUTHENTICATE:
            token = b"\x00" + user.encode() + b"\x00" + password.encode()
            _, op, body = self.call(0, AUTH_RESPONSE, struct.pack(">i", len(token)) + token)
            assert op == AUTH_SUCCESS, (op, body)
        else:
            assert op == READY, op
        return self


def error_code(body):
    return struct.unpack(">i", body[:4])[0]


def message(flags, body):
    """The message past the prefixes a response's flags announce (spec §2.2): tracing id,
    warnings, custom payload."""
    at = 0
    if flags & 0x02:
        at += 16
    if flags & 0x08:
        (n,) = struct.unpack(">H", body[at:at + 2])
        at += 2
        for _ in range(n):
            (m,) = struct.unpack(">H", body[at:at + 2])
            at += 2 + m
    if flags & 0x04:
        (n,) = struct.unpack(">H", body[at:at + 2])
        at += 2
        for _ in range(n):
            (m,) = struct.unpack(">H", body[at:at + 2])
            at += 2 + m
            (m,) = struct.unpack(">i", body[at:at + 4])
            at += 4 + max(m, 0)
    return body[at:]
