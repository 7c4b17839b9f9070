"""Issue 16's isolation suite. Clients in one keyspace share one upstream connection
(--pool-max-connections 1; the pool keeps a connection group per keyspace, so the hostile
client USEs each bystander's keyspace in turn to share its connection) to an emulator that, like Cassandra, closes a connection on a body
its own decoder cannot read (--close-on-protocol-error; that decoder shares no code with the
proxy's validator). While hostile clients send malformed bodies of every opcode, USE
spellings, a prepared USE, negative stream ids, traced and custom-payload requests, thousands
of seeded mutations of valid requests and the fuzz corpus, healthy Python drivers (with and
without lz4, logged in with passwords) read and write their own keyspaces and run prepared
system-table queries. Asserted: the healthy clients see no error and only their own data; the
upstream connection is the same one from start to end and was never closed; each hostile
request that could be answered got an answer (an ERROR where it was malformed) or a close."""
import random
import struct
import threading
import urllib.request
from pathlib import Path

import pytest
from cassandra import ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile

import rawcql as cql
from conftest import ROOT

USER, PASSWORD = "app", "s3cret"
MUTATIONS = 3000
CORPUS = ROOT / "fuzz" / "corpus"


def driver(port, compression):
    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
    return Cluster(["127.0.0.1"], port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                   protocol_version=4, connect_timeout=20, compression=compression,
                   auth_provider=PlainTextAuthProvider(username=USER, password=PASSWORD))


class Bystander(threading.Thread):
    """A healthy application: its own keyspace, reads and writes, prepared system tables."""

    def __init__(self, port, keyspace, compression):
        super().__init__(daemon=True)
        self.port, self.keyspace, self.compression = port, keyspace, compression
        self.stop, self.ready = threading.Event(), threading.Event()
        self.errors, self.rounds = [], 0

    def check(self, what, got, expected):
        if got != expected:
            self.errors.append(f"{self.keyspace} round {self.rounds}: {what}: {got!r} != {expected!r}")

    def run(self):
        try:
            with driver(self.port, self.compression) as c:
                s = c.connect(self.keyspace)
                write = s.prepare("INSERT INTO t (k, v) VALUES (?, ?)")
                read = s.prepare("SELECT v FROM t WHERE k = ?")
                peers = s.prepare("SELECT * FROM system.peers")
                local = s.prepare("SELECT cluster_name FROM system.local")
                self.ready.set()
                while not self.stop.is_set() or self.rounds < 5:
                    self.rounds += 1
                    k = 10_000 + self.rounds
                    s.execute(write, (k, f"{self.keyspace}-{k}"))
                    self.check("own write", s.execute(read, (k,)).one().v, f"{self.keyspace}-{k}")
                    # Unqualified: read in the keyspace this client chose, whatever others USE.
                    self.check("unqualified", s.execute("SELECT v FROM t WHERE k = 1").one().v,
                               self.keyspace)
                    self.check("peers", list(s.execute(peers)), [])
                    self.check("local", s.execute(local).one().cluster_name, "Amazon Keyspaces")
        except Exception as e:  # every error is a failure of isolation
            self.errors.append(f"{self.keyspace} round {self.rounds}: {type(e).__name__}: {e}")
        finally:
            self.ready.set()


def malformed():
    """(what, opcode, body, flags): bodies a strict server cannot decode, every opcode."""
    q = cql.query("SELECT v FROM iso_h.t WHERE k = 1")
    i32, i64 = (lambda n: struct.pack(">i", n)), (lambda n: struct.pack(">q", n))
    sid = b"\x01" * 16
    return [
        ("query: trailing byte", cql.QUERY, q + b"\x00", 0),
        ("query: unknown flag", cql.QUERY, cql.query("SELECT 1", flags=0x80), 0),
        ("query: page size 0", cql.QUERY, cql.query("SELECT 1", flags=0x04, tail=i32(0)), 0),
        ("query: value missing", cql.QUERY, cql.query("SELECT 1", flags=0x01, tail=b"\x00\x01"), 0),
        ("query: value length -3", cql.QUERY,
         cql.query("SELECT 1", flags=0x01, tail=b"\x00\x01" + i32(-3)), 0),
        ("query: unknown consistency", cql.QUERY, cql.query("SELECT 1", cl=0x00FF), 0),
        ("query: unknown serial consistency", cql.QUERY,
         cql.query("SELECT 1", flags=0x10, tail=b"\x00\xff"), 0),
        ("query: timestamp i64::MIN", cql.QUERY,
         cql.query("SELECT 1", flags=0x20, tail=i64(-2**63)), 0),
        ("query: invalid UTF-8", cql.QUERY, cql.long_string(b"SELECT \xc3\x28") + b"\x00\x01\x00", 0),
        ("query: negative length", cql.QUERY, i32(-5) + b"\x00\x01\x00", 0),
        ("query: truncated text", cql.QUERY, i32(100) + b"SELECT", 0),
        ("query: truncated name", cql.QUERY,
         cql.query("SELECT 1", flags=0x41, tail=b"\x00\x01\x00\x09ab"), 0),
        ("query: truncated paging state", cql.QUERY,
         cql.query("SELECT 1", flags=0x08, tail=i32(10) + b"abc"), 0),
        ("query: custom payload cut short", cql.QUERY, b"\x00\x01\x00\x05k" , 0x04),
        ("prepare: trailing byte", cql.PREPARE, cql.long_string("SELECT 1") + b"!", 0),
        ("prepare: truncated", cql.PREPARE, i32(50) + b"SELECT", 0),
        ("prepare: invalid UTF-8", cql.PREPARE, cql.long_string(b"\xff\xfe"), 0),
        ("execute: empty body", cql.EXECUTE, b"", 0),
        ("execute: id cut short", cql.EXECUTE, b"\x00\x10\x01\x01", 0),
        ("execute: no consistency", cql.EXECUTE, cql.string(sid), 0),
        ("execute: trailing byte", cql.EXECUTE, cql.execute(sid) + b"\x00", 0),
        ("execute: unknown flag", cql.EXECUTE, cql.execute(sid, flags=0x80), 0),
        ("batch: unknown type", cql.BATCH, cql.batch([], kind=3), 0),
        ("batch: unknown entry kind", cql.BATCH, b"\x00\x00\x01\x02", 0),
        ("batch: named values", cql.BATCH, cql.batch([], flags=0x40), 0),
        ("batch: unknown flag", cql.BATCH, cql.batch([], flags=0x01), 0),
        ("batch: trailing byte", cql.BATCH, cql.batch([(sid, [])]) + b"\x00", 0),
        ("batch: one entry of two", cql.BATCH, b"\x01\x00\x02\x01" + cql.string(sid) + b"\x00\x00", 0),
        ("register: truncated", cql.REGISTER, b"\x00\x02\x00\x0fSCHEMA", 0),
        ("register: trailing byte", cql.REGISTER, b"\x00\x01" + cql.string("SCHEMA_CHANGE") + b"!", 0),
        ("options: a body", cql.OPTIONS, b"\x00", 0),
    ]


def valid_requests(statement_id):
    """Valid requests that only touch the hostile client's own keyspace, to mutate."""
    values = struct.pack(">Hi", 1, 4) + struct.pack(">i", 7)
    return [
        (cql.QUERY, cql.query("SELECT v FROM iso_h.t WHERE k = 1")),
        (cql.QUERY, cql.query("INSERT INTO iso_h.t (k, v) VALUES (?, 'x')", cl=cql.LOCAL_QUORUM,
                              flags=0x25, tail=values[2:] + struct.pack(">i", 50) + struct.pack(">q", 5))),
        (cql.QUERY, cql.query("SELECT * FROM system.local", flags=0x3c,
                              tail=struct.pack(">i", 10) + struct.pack(">i", -1) + b"\x00\x09"
                              + struct.pack(">q", 1))),
        (cql.PREPARE, cql.long_string("SELECT v FROM iso_h.t WHERE k = ?")),
        (cql.EXECUTE, cql.execute(statement_id, flags=0x47,
                                  tail=struct.pack(">H", 1) + cql.string("k") + struct.pack(">i", 4)
                                  + struct.pack(">i", 1) + struct.pack(">i", 100))),
        (cql.BATCH, cql.batch([("INSERT INTO iso_h.t (k, v) VALUES (2, 'y')", []),
                               (statement_id, [struct.pack(">i", 3)])], flags=0x20,
                              tail=struct.pack(">q", 9))),
        (cql.REGISTER, b"\x00\x01" + cql.string("SCHEMA_CHANGE")),
        (cql.OPTIONS, b""),
    ]


def mutate(rng, body):
    b = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == 3 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 4:
            at = rng.randrange(len(b) + 1)
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(b)


def connect(port):
    return cql.RawClient(port).handshake(USER, PASSWORD)


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_hostile_clients_never_disturb_bystanders(start_emulator, start_proxy):
    emu = start_emulator("--close-on-protocol-error", "--rate-limit", "0", listen_on_peers=False)
    proxy = start_proxy(emu, "--pool-min-connections", "1", "--pool-max-connections", "1",
                        "--client-auth", "password", "--client-user", f"{USER}:{PASSWORD}")
    with driver(proxy.port, False) as c:
        s = c.connect()
        for ks in ("iso_a", "iso_b", "iso_h"):
            s.execute(f"CREATE KEYSPACE {ks} WITH replication = {{'class': 'SingleRegionStrategy'}}")
            s.execute(f"CREATE TABLE {ks}.t (k int PRIMARY KEY, v text)")
            s.execute(f"INSERT INTO {ks}.t (k, v) VALUES (1, '{ks}')")

    bystanders = [Bystander(proxy.port, "iso_a", False), Bystander(proxy.port, "iso_b", "lz4")]
    for b in bystanders:
        b.start()
    for b in bystanders:
        b.ready.wait(60)

    unanswered = []
    hostile = None

    def reconnect(keyspace="iso_a"):
        """A fresh hostile connection in a bystander's keyspace: on its upstream connection."""
        nonlocal hostile
        if hostile:
            hostile.close()
        hostile = connect(proxy.port)
        _, rop, rbody = hostile.call(1, cql.QUERY, cql.query(f"USE {keyspace}"))
        assert rop == cql.RESULT, rbody

    reconnect()

    # Malformed bodies of every opcode: a ProtocolError on that stream, the connection usable.
    for stream, (what, op, body, flags) in enumerate(malformed(), start=1):
        try:
            rflags, rop, rbody = hostile.call(stream, op, body, flags)
        except cql.Closed:
            reconnect()
            continue
        assert rop == cql.ERROR, what
        assert cql.error_code(cql.message(rflags, rbody)) == cql.PROTOCOL_ERROR, what

    # USE the parser cannot read exactly, a prepared USE: InvalidRequest to that client alone.
    for text in ["USE iso_b extra", "U/**/SE iso_b", "use\u00a0iso_b"]:
        _, rop, rbody = hostile.call(1, cql.QUERY, cql.query(text))
        assert (rop, cql.error_code(rbody)) == (cql.ERROR, cql.INVALID), text
    _, rop, rbody = hostile.call(1, cql.PREPARE, cql.long_string("USE iso_b"))
    assert (rop, cql.error_code(rbody)) == (cql.ERROR, cql.INVALID)

    # Negative streams (reserved for server events): an error, never silence.
    for stream in (-1, -32768):
        _, rop, rbody = hostile.call(stream, cql.QUERY, cql.query("SELECT v FROM iso_h.t"))
        assert (rop, cql.error_code(rbody)) == (cql.ERROR, cql.PROTOCOL_ERROR)

    # Traced and custom-payload requests that are valid are answered.
    rflags, rop, rbody = hostile.call(1, cql.QUERY, cql.query("SELECT v FROM iso_h.t WHERE k = 1"),
                                      flags=0x02)
    assert rop == cql.RESULT and rflags & 0x02, "a traced answer, its tracing id skipped"
    payload = b"\x00\x01" + cql.string("k") + struct.pack(">i", 1) + b"v"
    _, rop, rbody = hostile.call(1, cql.QUERY, payload + cql.query("SELECT v FROM iso_h.t"),
                                 flags=0x04)
    assert rop == cql.RESULT, rbody

    # Seeded mutations of valid requests, headers' flags included.
    _, rop, rbody = hostile.call(1, cql.PREPARE, cql.long_string("SELECT v FROM iso_h.t WHERE k = ?"))
    assert rop == cql.RESULT
    (kind,) = struct.unpack(">i", rbody[:4])
    (n,) = struct.unpack(">H", rbody[4:6])
    statement_id = rbody[6:6 + n]
    rng = random.Random(16)
    requests = valid_requests(statement_id)
    keyspace = "iso_a"
    for i in range(MUTATIONS):
        if i == MUTATIONS // 2:
            # An exact USE moves the hostile client alone, onto the other bystander's connection.
            keyspace = "iso_b"
            reconnect(keyspace)
        op, body = rng.choice(requests)
        flags = rng.choice([0, 0, 0, 0x02, 0x04, 0x08])
        stream = 1 + i % 30000
        try:
            hostile.call(stream, op, mutate(rng, body), flags)
        except cql.Closed:
            reconnect(keyspace)
        except TimeoutError:
            unanswered.append((op, flags))
            reconnect(keyspace)

    # The fuzz corpus, replayed as what a logged-in client sends.
    replayed = 0
    for path in sorted(p for p in CORPUS.glob("*/*") if p.is_file()):
        with connect(proxy.port) as raw:
            try:
                raw.send(path.read_bytes())
            except cql.Closed:
                pass
        replayed += 1
    hostile.close()

    for b in bystanders:
        b.stop.set()
    for b in bystanders:
        b.join(120)
        assert not b.is_alive()
    assert [e for b in bystanders for e in b.errors] == []
    assert all(b.rounds >= 5 for b in bystanders)
    assert unanswered == [], "requests left without an answer"
    assert replayed > 100

    # Per keyspace one upstream connection, the same from start to end, never closed, never
    # switched to another keyspace.
    events = emu.events()
    for ks in ("iso_a", "iso_b"):
        conns = {e["conn"] for e in events if e["event"] == "request" and e["keyspace"] == ks}
        assert len(conns) == 1, (ks, conns)
    assert [e for e in events if e["event"] in ("undecodable", "disconnect")] == []
    assert metric(proxy.metrics_port, "keyspaces_proxy_upstream_keyspace_switches_total") == 0
