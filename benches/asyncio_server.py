#!/usr/bin/env python3
"""An independent CQL server for benchmarks, in another language and runtime than the
emulator: Python asyncio, TLS by OpenSSL, each answer written as two writes (header, then
body: two TLS records). It answers just what keyspaces-load and keyspaces-proxy ask: OPTIONS,
STARTUP (READY, no authentication), REGISTER, schema statements, system.peers (empty), and
PREPARE/EXECUTE of one table's INSERT and SELECT, whose single row it returns.

  asyncio_server.py --port P --cert server.pem --key server-key.pem [--delay-us N]

Prints {"listen": "127.0.0.1:P"} once listening. Loopback only."""
import argparse
import asyncio
import json
import ssl
import struct
import time

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=0)
p.add_argument("--cert", required=True)
p.add_argument("--key", required=True)
p.add_argument("--delay-us", type=int, default=0, help="busy work before each answer")
a = p.parse_args()

OPTIONS, STARTUP, READY, SUPPORTED, QUERY, RESULT, PREPARE, EXECUTE, REGISTER = 5, 1, 2, 6, 7, 8, 9, 10, 11


def string(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def short_bytes(b):
    return struct.pack(">H", len(b)) + b


def long_string(body, at):
    (n,) = struct.unpack_from(">i", body, at)
    return body[at + 4:at + 4 + n].decode(), at + 4 + n


def spec(columns):
    """Global table spec: flags, count, keyspace, table, then name/type per column."""
    out = struct.pack(">ii", 0x0001, len(columns)) + string("load") + string("kv")
    for name, typ in columns:
        out += string(name) + struct.pack(">H", typ)
    return out


INT, BLOB = 0x0009, 0x0003
VOID = struct.pack(">i", 1)
value = b"\x5a" * 64


def prepared(stmt_id, binds, results):
    meta = struct.pack(">iii", 0x0001, len(binds), 1 if binds else 0)
    if binds:
        meta += struct.pack(">H", 0) + string("load") + string("kv")
        for name, typ in binds:
            meta += string(name) + struct.pack(">H", typ)
    else:
        meta = struct.pack(">iii", 0, 0, 0)
    res = spec(results) if results else struct.pack(">ii", 0x0004, 0)
    return struct.pack(">i", 4) + short_bytes(stmt_id) + meta + res


def rows(columns, data):
    out = struct.pack(">i", 2) + spec(columns) + struct.pack(">i", len(data))
    for row in data:
        for cell in row:
            out += struct.pack(">i", len(cell)) + cell
    return out


def answer(op, body):
    if op == OPTIONS:
        return SUPPORTED, struct.pack(">H", 2) + string("CQL_VERSION") + struct.pack(">H", 1) + string("3.4.4") \
            + string("COMPRESSION") + struct.pack(">H", 0)
    if op in (STARTUP, REGISTER):
        return READY, b""
    if op == QUERY:
        text, _ = long_string(body, 0)
        if "system.peers" in text:
            return RESULT, struct.pack(">i", 2) + struct.pack(">ii", 0x0001, 1) + string("system") + string("peers") \
                + string("peer") + struct.pack(">H", 0x0010) + struct.pack(">i", 0)
        return RESULT, VOID
    if op == PREPARE:
        text, _ = long_string(body, 0)
        if text.lstrip().upper().startswith("SELECT"):
            return RESULT, prepared(b"sel", [("k", INT)], [("v", BLOB)])
        return RESULT, prepared(b"ins", [("k", INT), ("v", BLOB)], [])
    if op == EXECUTE:
        (n,) = struct.unpack_from(">H", body, 0)
        if body[2:2 + n] == b"sel":
            return RESULT, rows([("v", BLOB)], [[value]])
        return RESULT, VOID
    return 0, struct.pack(">i", 0x000A) + string("unsupported")  # PROTOCOL_ERROR


def busy(us):
    end = time.perf_counter_ns() + us * 1000
    while time.perf_counter_ns() < end:
        pass


class Cql(asyncio.Protocol):
    def connection_made(self, transport):
        self.t, self.buf = transport, b""

    def data_received(self, data):
        self.buf += data
        while len(self.buf) >= 9:
            version, flags, stream, op, length = struct.unpack_from(">BBhBi", self.buf, 0)
            if len(self.buf) < 9 + length:
                return
            body, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
            if a.delay_us:
                busy(a.delay_us)
            rop, rbody = answer(op, body)
            self.t.write(struct.pack(">BBhBi", 0x80 | (version & 0x7F), 0, stream, rop, len(rbody)))
            self.t.write(rbody)


async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    server = await asyncio.get_running_loop().create_server(Cql, "127.0.0.1", a.port, ssl=ctx)
    host, port = server.sockets[0].getsockname()[:2]
    print(json.dumps({"listen": f"{host}:{port}"}), flush=True)
    await server.serve_forever()


asyncio.run(main())
