"""Unmodified drivers through keyspaces-proxy to the emulator (TLS + SigV4 upstream)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cassandra import AuthenticationFailed, ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.query import SimpleStatement

from conftest import AKID

ROWS = 5200


def default_cluster(port, **kw):
    # Driver defaults throughout; only the consistency is set, as AWS's own examples do.
    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
    return Cluster(["127.0.0.1"], port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile}, **kw)


def test_default_driver_through_proxy(start_emulator, start_proxy):
    # The emulator keeps Keyspaces' 3,000 req/s per-connection cap: the proxy's pool spreads the
    # driver's single connection over several upstream ones, so nothing is throttled.
    emu = start_emulator()
    port = start_proxy(emu).port
    c = default_cluster(port)
    try:
        s = c.connect()
        assert c.protocol_version == 4  # negotiated down from DSE/v5 probes
        hosts = c.metadata.all_hosts()
        assert len(hosts) == 1, hosts
        assert hosts[0].endpoint.address == "127.0.0.1" and hosts[0].endpoint.port == port
        local = s.execute("SELECT cluster_name, rpc_address, partitioner FROM system.local").one()
        assert local.cluster_name == "Amazon Keyspaces"
        assert local.rpc_address == "127.0.0.1"
        assert list(s.execute("SELECT * FROM system.peers")) == []

        s.execute("CREATE KEYSPACE viaproxy WITH replication = {'class': 'SingleRegionStrategy'}")
        s.execute("CREATE TABLE viaproxy.t (k int, c int, v text, PRIMARY KEY (k, c))")
        s.execute("INSERT INTO viaproxy.t (k, c, v) VALUES (0, 0, 'simple')")
        assert s.execute("SELECT v FROM viaproxy.t WHERE k = 0").one().v == "simple"
        insert = s.prepare("INSERT INTO viaproxy.t (k, c, v) VALUES (?, ?, ?)")
        results = execute_concurrent_with_args(s, insert, [(1, i, f"v{i}") for i in range(ROWS)], concurrency=50)
        assert all(ok for ok, _ in results)
        select = s.prepare("SELECT c, v FROM viaproxy.t WHERE k = ?")
        first = s.execute(select, (1,))
        assert first.has_more_pages
        rows = list(first)
        assert len(rows) == ROWS and rows[4999].c == 4999
        small_pages = list(s.execute(SimpleStatement("SELECT c FROM viaproxy.t WHERE k = 1", fetch_size=700)))
        assert len(small_pages) == ROWS
        s.set_keyspace("viaproxy")
        assert s.execute("SELECT v FROM t WHERE k = 0").one().v == "simple"
    finally:
        c.shutdown()

    events = emu.events()
    connects = [e for e in events if e["event"] == "connect"]
    assert connects
    # The proxy spreads its own connections over the peer addresses (system.peers); the driver
    # never reaches one: every connection authenticated with the proxy's SigV4 key.
    auths = [e for e in events if e["event"] == "auth"]
    assert auths and all(e["mode"] == "sigv4" and e["ok"] and e["who"] == AKID for e in auths)
    authenticated = {e["conn"] for e in auths}
    strays = [e for e in connects if e["conn"] not in authenticated]
    assert not strays, f"a connection that is not the proxy's: {strays}"


def test_one_driver_connection_beats_the_per_connection_cap(start_emulator, start_proxy):
    emu = start_emulator("--rate-limit", "500", listen_on_peers=False)
    port = start_proxy(emu, "--max-rate-per-connection", "400").port
    c = default_cluster(port)
    try:
        s = c.connect()
        stmt = s.prepare("SELECT key FROM system.local")
        results = execute_concurrent_with_args(s, stmt, [()] * 4000, concurrency=200, raise_on_first_error=False)
        failures = [r for ok, r in results if not ok]
        assert failures == [], failures[:3]
    finally:
        c.shutdown()
    requests = [e for e in emu.events() if e["event"] == "request"]
    upstream = {e["conn"] for e in requests}
    assert len(upstream) >= 5, f"spread over {len(upstream)} upstream connections"


def test_password_mode(start_emulator, start_proxy, tmp_path):
    emu = start_emulator(listen_on_peers=False)
    users = tmp_path / "users"
    users.write_text("app:app-secret\n")
    port = start_proxy(emu, "--client-auth", "password", "--client-credentials-file", str(users)).port
    c = default_cluster(port, auth_provider=PlainTextAuthProvider("app", "app-secret"))
    try:
        assert c.connect().execute("SELECT release_version FROM system.local").one().release_version == "3.11.2"
    finally:
        c.shutdown()
    bad = default_cluster(port, auth_provider=PlainTextAuthProvider("app", "wrong"))
    with pytest.raises(NoHostAvailable) as err:
        bad.connect()
    bad.shutdown()
    assert any(isinstance(e, AuthenticationFailed) for e in err.value.errors.values())
    assert "Provided username app and/or password are incorrect" in str(err.value)


def test_argon2_passwords_from_hash_password(start_emulator, start_proxy, aws_env):
    """`hash-password` prints an argon2id hash a users entry takes as is; plaintext entries
    still work but warn at startup."""
    from conftest import BIN_DIR

    phc = subprocess.run([str(BIN_DIR / "keyspaces-proxy"), "hash-password"], input="s3cret\n",
                         capture_output=True, text=True, check=True, env=aws_env).stdout.strip()
    assert phc.startswith("$argon2id$v=19$") and "s3cret" not in phc
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu, "--client-auth", "password", "--client-user", f"app:{phc}")
    with default_cluster(proxy.port, auth_provider=PlainTextAuthProvider("app", "s3cret")) as c:
        assert c.connect().execute("SELECT cluster_name FROM system.local").one()
    with default_cluster(proxy.port, auth_provider=PlainTextAuthProvider("app", "s3cre")) as bad:
        with pytest.raises(NoHostAvailable):
            bad.connect()
    assert "unsalted sha256" not in proxy.log_path.read_text()
    weak = start_proxy(emu, "--client-auth", "password", "--client-user", "app:plain")
    with default_cluster(weak.port, auth_provider=PlainTextAuthProvider("app", "plain")) as c:
        assert c.connect().execute("SELECT cluster_name FROM system.local").one()
    assert "1 client user(s) have plaintext or unsalted sha256 passwords" in weak.log_path.read_text()


@pytest.mark.parametrize("mode", ["plain", "astra"])
def test_plain_credential_upstreams(start_emulator, start_proxy, aws_env, mode):
    """Keyspaces service-specific credentials / Cassandra users, and Astra application tokens
    (PLAIN user `token`), chosen per deployment; the secret comes from the environment."""
    token = "AstraCS:abc:0123456789abcdef"
    emu = start_emulator("--plain-user", f"token:{token}", listen_on_peers=False)
    if mode == "plain":
        args, secret = ["--upstream-auth", "plain", "--upstream-username", "svc-user"], "svc-pass"
    else:
        args, secret = ["--upstream-auth", "astra"], token
    env = dict(aws_env, KEYSPACES_PROXY_UPSTREAM_PASSWORD=secret)
    port = start_proxy(emu, *args, env=env).port
    c = default_cluster(port)
    try:
        assert c.connect().execute("SELECT release_version FROM system.local").one()
    finally:
        c.shutdown()
    auths = [e for e in emu.events() if e.get("event") == "auth"]
    who = "svc-user" if mode == "plain" else "token"
    assert auths and all(e["mode"] == "plain" and e["who"] == who and e["ok"] for e in auths)


def test_cqlsh_through_proxy(start_emulator, start_proxy, aws_env):
    emu = start_emulator(listen_on_peers=False)
    port = start_proxy(emu).port
    cqlsh = Path(sys.executable).parent / "cqlsh"
    out = subprocess.run(
        [str(cqlsh), "127.0.0.1", str(port), "-e", "SELECT cluster_name, rpc_address FROM system.local"],
        env=aws_env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Amazon Keyspaces" in out.stdout and "127.0.0.1" in out.stdout


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-name"])
def test_untrusted_upstream_is_refused_with_a_clear_error(start_emulator, start_proxy, tmp_path, case):
    emu = start_emulator(listen_on_peers=False)
    if case == "wrong-ca":
        other = start_emulator(state_dir=tmp_path / "other-ca", listen_on_peers=False)
        port = start_proxy(emu, ca_file=other.ca).port
    else:
        port = start_proxy(emu, server_name="cassandra.eu-west-1.amazonaws.com").port
    c = default_cluster(port, connect_timeout=10)
    with pytest.raises(NoHostAvailable) as err:
        c.connect()
    c.shutdown()
    message = str(err.value)
    assert "cannot reach Keyspaces" in message and "certificate" in message, message
    assert not [e for e in emu.events() if e["event"] == "auth"]
