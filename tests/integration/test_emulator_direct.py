"""The emulator as Keyspaces: the official SigV4 plugin and cqlsh talk to it directly over TLS."""
import ssl
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from cassandra import AuthenticationFailed, ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.concurrent import execute_concurrent_with_args
import cassandra_sigv4.auth as sigv4_plugin
from cassandra_sigv4.auth import SigV4AuthProvider

from conftest import AKID, REGION, SECRET

ROWS = 5200


def _three_digit_timestamp(date_time):
    return "{0}.{1:03d}Z".format(date_time.strftime(sigv4_plugin._SIGV4_TIMESTAMP_FORMAT), date_time.microsecond // 1000)


# The official plugin (4.0.2) rounds milliseconds, so about one handshake in 2,000 (microseconds
# >= 999,500) it sends `amzdate=...:SS.1000Z`, which Keyspaces' strict format (and so the
# emulator) refuses as malformed. Only that formatting is replaced, with the truncation the other
# plugins use; the signature and the exchange stay the plugin's own. keyspaces-proxy truncates.
sigv4_plugin._format_timestamp = _three_digit_timestamp


def tls_context(ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    # The driver dials peer IPs; the plugin docs disable hostname checks for that reason.
    ctx.check_hostname = False
    return ctx


def cluster(emulator, auth_provider):
    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
    return Cluster(
        [emulator.host],
        port=emulator.port,
        ssl_context=tls_context(emulator.ca),
        auth_provider=auth_provider,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=10,
    )


def sigv4_provider(secret=SECRET):
    session = boto3.Session(aws_access_key_id=AKID, aws_secret_access_key=secret, region_name=REGION)
    return SigV4AuthProvider(session)


def test_official_sigv4_plugin_reads_writes_and_pages(start_emulator):
    emu = start_emulator()
    c = cluster(emu, sigv4_provider())
    try:
        s = c.connect()
        local = s.execute("SELECT cluster_name, release_version, data_center FROM system.local").one()
        assert local.cluster_name == "Amazon Keyspaces"
        assert local.release_version == "3.11.2"
        assert local.data_center == REGION
        # Nine load-balancer peers, like the public endpoint.
        assert len(c.metadata.all_hosts()) == 10
        s.execute("CREATE KEYSPACE direct WITH replication = {'class': 'SingleRegionStrategy'}")
        s.execute("CREATE TABLE direct.rows (k int, c int, v text, PRIMARY KEY (k, c))")
        insert = s.prepare("INSERT INTO direct.rows (k, c, v) VALUES (?, ?, ?)")
        results = execute_concurrent_with_args(s, insert, [(1, i, f"v{i}") for i in range(ROWS)], concurrency=20)
        assert all(ok for ok, _ in results)
        first = s.execute("SELECT c, v FROM direct.rows WHERE k = 1")
        assert first.has_more_pages  # default fetch size is 5000
        rows = list(first)
        assert len(rows) == ROWS
        assert rows[-1].v == f"v{ROWS - 1}"
    finally:
        c.shutdown()
    auths = [e for e in emu.events() if e["event"] == "auth"]
    assert auths and all(e["mode"] == "sigv4" and e["ok"] for e in auths)
    assert all(e["who"] == AKID for e in auths)


def test_wrong_secret_is_authentication_failed(start_emulator):
    emu = start_emulator(listen_on_peers=False)
    c = cluster(emu, sigv4_provider("not-the-secret"))
    with pytest.raises(NoHostAvailable) as err:
        c.connect()
    c.shutdown()
    assert any(isinstance(e, AuthenticationFailed) for e in err.value.errors.values())
    assert "Invalid signature" in str(err.value)


def test_plaintext_auth_provider_uses_service_specific_credentials(start_emulator):
    emu = start_emulator(listen_on_peers=False)
    c = cluster(emu, PlainTextAuthProvider("svc-user", "svc-pass"))
    try:
        assert c.connect().execute("SELECT rack FROM system.local").one().rack == REGION
    finally:
        c.shutdown()
    bad = cluster(emu, PlainTextAuthProvider("svc-user", "wrong"))
    with pytest.raises(NoHostAvailable):
        bad.connect()
    bad.shutdown()


def test_cqlsh_over_tls(start_emulator, aws_env):
    emu = start_emulator(listen_on_peers=False)
    cqlsh = Path(sys.executable).parent / "cqlsh"
    env = dict(aws_env, SSL_CERTFILE=emu.ca, SSL_VALIDATE="true")
    out = subprocess.run(
        [str(cqlsh), emu.host, str(emu.port), "--ssl", "-u", "svc-user", "-p", "svc-pass",
         "-e", "SELECT cluster_name FROM system.local"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Amazon Keyspaces" in out.stdout
