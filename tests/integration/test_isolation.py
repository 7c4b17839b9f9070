"""Clients sharing one upstream connection (--pool-max-connections 1) with the real Python driver:
nothing a hostile client sends changes what a bystander reads, and clients that speak another
protocol are told at once."""
import socket
import ssl

import pytest
from cassandra import ConsistencyLevel, InvalidRequest
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile

ONE_CONNECTION = ("--pool-min-connections", "1", "--pool-max-connections", "1")


def cluster(port, **kw):
    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
    return Cluster(["127.0.0.1"], port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                   protocol_version=4, connect_timeout=20, **kw)


@pytest.fixture
def shared(start_emulator, start_proxy):
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu, *ONE_CONNECTION)
    with cluster(proxy.port) as c:
        s = c.connect()
        for ks in ("iso_a", "iso_b"):
            s.execute(f"CREATE KEYSPACE {ks} WITH replication = {{'class': 'SingleRegionStrategy'}}")
            s.execute(f"CREATE TABLE {ks}.t (k int PRIMARY KEY, v text)")
            s.execute(f"INSERT INTO {ks}.t (k, v) VALUES (1, '{ks}')")
    return proxy


@pytest.mark.parametrize("compression", [False, "lz4"])
def test_use_spellings_cannot_switch_a_shared_connection(shared, compression):
    with cluster(shared.port, compression=compression) as bc, \
            cluster(shared.port, compression=compression) as hc:
        bystander = bc.connect("iso_a")
        hostile = hc.connect("iso_a")

        def bystander_reads_its_own():
            assert bystander.execute("SELECT v FROM t WHERE k = 1").one().v == "iso_a"

        bystander_reads_its_own()
        for cql in ["USE iso_b extra", "USE iso_b; SELECT * FROM t", "\ufeffUSE iso_b",
                    "use\u00a0iso_b", "USE iso_b.t", "USE \"iso_b", "U/**/SE iso_b",
                    "us/* x */e iso_b"]:
            with pytest.raises(InvalidRequest, match="accepts USE only as"):
                hostile.execute(cql)
            bystander_reads_its_own()
        with pytest.raises(InvalidRequest, match="cannot be prepared"):
            hostile.prepare("USE iso_b")
        bystander_reads_its_own()
        # Exact spellings, comments included, switch only the client that sent them.
        for cql in ["USE iso_b -- the other keyspace", "/* why */ USE\tiso_b ;"]:
            hostile.execute(cql)
            assert hostile.execute("SELECT v FROM t WHERE k = 1").one().v == "iso_b"
            bystander_reads_its_own()
            hostile.execute("USE iso_a")


@pytest.mark.parametrize("compression", [False, "lz4"])
def test_password_logins_with_and_without_compression(start_emulator, start_proxy, compression):
    """Drivers compress the AUTH_RESPONSE once STARTUP negotiated an algorithm."""
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu, "--client-auth", "password", "--client-user", "app:s3cret")
    auth = PlainTextAuthProvider(username="app", password="s3cret")
    with cluster(proxy.port, compression=compression, auth_provider=auth) as c:
        row = c.connect().execute("SELECT cluster_name FROM system.local").one()
        assert row.cluster_name == "Amazon Keyspaces"


def test_tls_and_http_on_the_plaintext_port_are_answered_at_once(start_emulator, start_proxy):
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as raw:
        # The proxy closes instead of waiting out the 30 s handshake deadline; the timeout here
        # only bounds a broken build.
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with ctx.wrap_socket(raw) as tls:
                tls.recv(1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert b"--metrics-listen" in reply
    log = proxy.log_path.read_text()
    assert "the client speaks TLS, but the proxy's client port is plaintext" in log
    # The port still serves CQL.
    with cluster(proxy.port) as c:
        assert c.connect().execute("SELECT cluster_name FROM system.local").one()


def test_malformed_bodies_get_an_error_and_never_reach_the_shared_connection(shared):
    """A raw client sends a QUERY whose body has a trailing byte; a bystander keeps working."""
    import struct

    with cluster(shared.port) as bc:
        bystander = bc.connect("iso_a")
        with socket.create_connection(("127.0.0.1", shared.port), timeout=20) as s:
            def frame(stream, opcode, body):
                return struct.pack(">BBhBi", 4, 0, stream, opcode, len(body)) + body

            def read_frame():
                head = b""
                while len(head) < 9:
                    head += s.recv(9 - len(head))
                _, _, stream, opcode, length = struct.unpack(">BBhBi", head)
                body = b""
                while len(body) < length:
                    body += s.recv(length - len(body))
                return stream, opcode, body

            startup = struct.pack(">H", 1) + b"\x00\x0bCQL_VERSION\x00\x053.0.0"
            s.sendall(frame(0, 0x01, startup))
            assert read_frame()[1] == 0x02  # READY
            text = b"SELECT v FROM iso_a.t WHERE k = 1"
            good = struct.pack(">i", len(text)) + text + struct.pack(">HB", 6, 0)
            for stream, body in [(1, good + b"\x00"), (2, good[:-1] + b"\x80"),
                                 (3, good[:-1] + b"\x04" + struct.pack(">i", 0))]:
                s.sendall(frame(stream, 0x07, body))
                got_stream, opcode, err = read_frame()
                assert (got_stream, opcode) == (stream, 0x00)
                assert struct.unpack(">i", err[:4])[0] == 0x000A, err  # ProtocolError
                assert bystander.execute("SELECT v FROM t WHERE k = 1").one().v == "iso_a"
            s.sendall(frame(4, 0x07, good))
            assert read_frame()[:2] == (4, 0x08)  # the connection is still usable


def test_system_tables_prepared_elsewhere_are_still_rewritten(start_emulator, start_proxy):
    """gocql and every driver after a reconnect reuse statement ids on new connections: an
    EXECUTE is classified by what the pool knows of the id, and an id this proxy never saw
    prepared (another replica, a restart) is answered UNPREPARED so the driver prepares it again
    here. Either way system.peers stays empty: drivers must never learn Keyspaces' own nodes."""
    emu = start_emulator(listen_on_peers=False)
    proxy, other_proxy = start_proxy(emu), start_proxy(emu)
    with cluster(proxy.port) as a, cluster(proxy.port) as b, cluster(other_proxy.port) as c:
        prepared = a.connect().prepare("SELECT * FROM system.peers")
        # The same pool, another client connection.
        assert list(b.connect().execute(prepared)) == []
        # Another proxy: UNPREPARED, the driver re-prepares through it, then the same answer.
        assert list(c.connect().execute(prepared)) == []
    # The emulator itself lists nine peers (test_emulator_direct.py): the proxy hides them.


def test_host_id_is_stable_across_connections_and_restarts(start_emulator, start_proxy):
    """Drivers key nodes and prepared statements by host_id: the proxy reports its own, derived
    from --host-id-seed and its address, whichever upstream connection answered."""
    emu = start_emulator(listen_on_peers=False)
    first, restarted = start_proxy(emu), start_proxy(emu)
    seeded = start_proxy(emu, "--host-id-seed", "blue")
    ids = []
    for proxy in (first, first, restarted, seeded):
        with cluster(proxy.port) as c:
            row = c.connect().execute("SELECT host_id, tokens FROM system.local").one()
            ids.append(row.host_id)
            # The emulator reports three tokens; the proxy one, the same on every connection,
            # so the driver's ring never changes as its control connection moves.
            assert set(row.tokens) == {"0"}, row.tokens
            assert len(c.metadata.token_map.ring) == 1
    assert ids[0] == ids[1] == ids[2], ids
    assert ids[3] != ids[0], "another seed, another host_id"
    assert ids[0].version == 5
