"""What the Python driver negotiates and sees through the proxy: frame compression (LZ4,
Snappy) used on the wire in both directions, and the topology `--advertise-address` presents."""
import ssl
import time
import urllib.request

import pytest
from cassandra import ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.query import BatchStatement, SimpleStatement

ROWS = 120
BATCH = 20  # Keyspaces allows 30 statements in a batch
# Repetitive text: compresses many times over, so compressed and plain traffic differ by far
# more than the protocol's own overhead.
FILLER = "keyspaces-proxy carries this row compressed " * 64


def driver(port, **kw):
    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
    return Cluster(["127.0.0.1"], port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile}, **kw)


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def wait_for_metric(port, name, at_least, timeout=20):
    # The proxy counts bytes once written; the driver may hold the answer a moment before that.
    deadline = time.time() + timeout
    while True:
        value = metric(port, name)
        if value >= at_least or time.time() > deadline:
            return value
        time.sleep(0.05)


def driver_connections(cluster, session):
    return cluster.control_connection.get_connections() + [
        conn for pool in session.get_pools() for conn in pool.get_connections()]


@pytest.mark.parametrize("mode", ["pooled", "dedicated"])
# True is the driver's default: it must still pick lz4 with python-snappy installed beside it.
@pytest.mark.parametrize("compression", [False, True, "lz4", "snappy"])
def test_compression_is_negotiated_and_used_on_the_wire(start_emulator, start_proxy, mode, compression):
    # The emulator offers both algorithms upstream too: a dedicated connection should carry the
    # client's choice to it, while the shared pool stays uncompressed and the proxy compresses.
    emu = start_emulator("--compression", "lz4,snappy")
    proxy = start_proxy(emu, "--upstream-mode", mode)
    rows = {i: f"{i:05d} {FILLER}" for i in range(ROWS)}
    payload = sum(len(v) for v in rows.values())
    algo = {False: None, True: "lz4"}.get(compression, compression)

    c = driver(proxy.port, compression=compression)
    try:
        s = c.connect()
        conns = driver_connections(c, s)
        assert len(conns) >= 2, conns  # the control connection and the session's
        for conn in conns:
            # The driver arms its compressor only once the proxy accepted a STARTUP naming it.
            assert conn._compression_type == algo, conn
            assert (conn.compressor is not None) == bool(algo), conn
            assert (conn.decompressor is not None) == bool(algo), conn

        s.execute("CREATE KEYSPACE comp WITH replication = {'class': 'SingleRegionStrategy'}")
        s.execute("CREATE TABLE comp.t (k int, c int, v text, PRIMARY KEY (k, c))")
        insert = s.prepare("INSERT INTO comp.t (k, c, v) VALUES (?, ?, ?)")

        received = metric(proxy.metrics_port, "keyspaces_proxy_client_received_bytes_total")
        for start in range(0, ROWS, BATCH):
            batch = BatchStatement(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
            for i in range(start, start + BATCH):
                batch.add(insert, (1, i, rows[i]))
            s.execute(batch)
        # Counted when read, before the answer the driver waited for: no race here.
        received = metric(proxy.metrics_port, "keyspaces_proxy_client_received_bytes_total") - received

        sent = metric(proxy.metrics_port, "keyspaces_proxy_client_sent_bytes_total")
        select = s.prepare("SELECT c, v FROM comp.t WHERE k = ?")
        select.fetch_size = 25
        first = s.execute(select, (1,))
        assert first.has_more_pages
        got = {r.c: r.v for r in first}
        assert got == rows
        unprepared = SimpleStatement("SELECT c, v FROM comp.t WHERE k = 1", fetch_size=40)
        assert {r.c: r.v for r in s.execute(unprepared)} == rows
        # Plain, the count must reach twice the payload: wait for it. Compressed, a reading taken
        # now can only fall short of the truth by the last write, which the bound below allows.
        expect = sent + 2 * payload if not algo else 0
        sent = wait_for_metric(proxy.metrics_port, "keyspaces_proxy_client_sent_bytes_total", expect) - sent
    finally:
        c.shutdown()

    # Both reads returned the payload twice over; the writes carried it once.
    if algo:
        assert received < payload / 5, (received, payload)
        assert sent < 2 * payload / 5, (sent, payload)
    else:
        assert received >= payload, (received, payload)
        assert sent >= 2 * payload, (sent, payload)

    startups = [dict(e["options"]) for e in emu.events() if e["event"] == "startup"]
    assert startups
    upstream_algos = {o.get("COMPRESSION") for o in startups}
    if mode == "dedicated" and algo:
        assert algo in upstream_algos, startups
    else:
        assert upstream_algos == {None}, startups


@pytest.mark.parametrize("advertise", [None, "127.0.0.2"])
def test_advertise_address_is_what_the_driver_sees(start_emulator, start_proxy, advertise):
    # The emulator on its own loopback address: the upstream's system.local (127.0.0.3) and
    # system.peers (127.0.1.x) are then told apart from what the proxy puts in their place.
    emu = start_emulator(listen="127.0.0.3:0")
    proxy = start_proxy(emu, *(["--advertise-address", advertise] if advertise else []))
    # Nothing listens on the advertised address here, as with a pod IP behind a Service: the
    # driver must keep dialling its contact point.
    expected = advertise or "127.0.0.1"

    c = driver(proxy.port)
    try:
        s = c.connect()
        hosts = c.metadata.all_hosts()
        assert len(hosts) == 1, hosts
        host = hosts[0]
        assert (host.endpoint.address, host.endpoint.port) == ("127.0.0.1", proxy.port)
        assert host.is_up
        assert host.broadcast_rpc_address == expected
        assert host.broadcast_address == expected
        assert host.listen_address == expected

        columns = "rpc_address, broadcast_address, listen_address, host_id"
        local = s.execute(f"SELECT {columns} FROM system.local").one()
        assert (local.rpc_address, local.broadcast_address, local.listen_address) == (expected,) * 3
        assert local.host_id == host.host_id
        # Prepared, the answer may skip its metadata: the proxy rewrites it all the same.
        prepared = s.execute(s.prepare(f"SELECT {columns} FROM system.local")).one()
        assert prepared == local
        assert list(s.execute("SELECT peer, rpc_address FROM system.peers")) == []

        for conn in driver_connections(c, s):
            assert (conn.endpoint.address, conn.endpoint.port) == ("127.0.0.1", proxy.port)
            assert conn._socket.getpeername() == ("127.0.0.1", proxy.port)
    finally:
        c.shutdown()

    # What the proxy replaced: the upstream, asked directly, names itself and its peers.
    ctx = ssl.create_default_context(cafile=emu.ca)
    ctx.check_hostname = False  # the emulator's certificate names Keyspaces' host, not an IP
    up = Cluster([emu.host], port=emu.port, ssl_context=ctx,
                 auth_provider=PlainTextAuthProvider("svc-user", "svc-pass"))
    try:
        us = up.connect()
        assert us.execute("SELECT rpc_address FROM system.local").one().rpc_address == "127.0.0.3"
        assert len(list(us.execute("SELECT peer FROM system.peers"))) >= 1
    finally:
        up.shutdown()
