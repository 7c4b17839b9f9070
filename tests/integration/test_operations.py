"""Operating the proxy: metrics after real traffic, readiness, graceful shutdown, secret-free logs."""
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest
from cassandra import ConsistencyLevel, InvalidRequest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.query import SimpleStatement

from conftest import AKID, SECRET


def cluster(port):
    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
    return Cluster(["127.0.0.1"], port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=10)


def http_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text):
    """{series: value} from the exposition text."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_move_with_real_traffic(start_emulator, start_proxy):
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu)
    status, before = http_get(proxy.metrics_port, "/metrics")
    assert status == 200
    before = samples(before)
    c = cluster(proxy.port)
    try:
        s = c.connect()
        s.execute("CREATE KEYSPACE m WITH replication = {'class': 'SingleRegionStrategy'}")
        s.execute("CREATE TABLE m.t (k int PRIMARY KEY, v text)")
        ins = s.prepare("INSERT INTO m.t (k, v) VALUES (?, ?)")
        for i in range(50):
            s.execute(ins, (i, "x"))
        with pytest.raises(InvalidRequest):  # Keyspaces refuses LOCAL_ONE writes
            s.execute(SimpleStatement("INSERT INTO m.t (k, v) VALUES (1, 'y')", consistency_level=ConsistencyLevel.LOCAL_ONE))
    finally:
        c.shutdown()
    status, text = http_get(proxy.metrics_port, "/metrics")
    after = samples(text)
    delta = lambda k: after.get(k, 0) - before.get(k, 0)
    assert delta('keyspaces_proxy_requests_total{opcode="EXECUTE"}') >= 50
    assert delta('keyspaces_proxy_requests_total{opcode="QUERY"}') >= 3
    assert delta('keyspaces_proxy_request_duration_seconds_count{opcode="EXECUTE"}') >= 50
    assert delta('keyspaces_proxy_client_handshakes_total{result="ok"}') >= 1
    assert after['keyspaces_proxy_upstream_handshakes_total{auth="sigv4",result="ok"}'] >= 1
    assert delta('keyspaces_proxy_upstream_errors_total{code="invalid"}') >= 1
    assert delta("keyspaces_proxy_client_received_bytes_total") > 0
    assert delta("keyspaces_proxy_client_sent_bytes_total") > 0
    assert after['keyspaces_proxy_upstream_connections{state="ready"}'] >= 1
    assert after["keyspaces_proxy_credentials_expiry_seconds"] == float("inf")
    assert "keyspaces_proxy_upstream_tls_handshake_duration_seconds_bucket" in text
    # Bounded labels only: no query text, no client address.
    assert "INSERT" not in text and "127.0.0.1" not in text
    assert http_get(proxy.metrics_port, "/livez")[0] == 200


def test_readyz_follows_the_upstream(start_emulator, start_proxy, tmp_path):
    from conftest import free_port

    port = free_port()
    state = tmp_path / "flip-state"
    emu = start_emulator(listen_on_peers=False, listen=f"127.0.0.1:{port}", state_dir=state)
    proxy = start_proxy(emu, "--pool-min-connections", "1")
    status, body = http_get(proxy.metrics_port, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True

    emu.proc.terminate()
    emu.proc.wait(timeout=10)
    deadline = time.time() + 30
    while time.time() < deadline:
        status, body = http_get(proxy.metrics_port, "/readyz")
        if status == 503:
            break
        time.sleep(0.2)
    assert status == 503, body
    assert json.loads(body)["ready"] is False and json.loads(body)["reason"]

    start_emulator(listen_on_peers=False, listen=f"127.0.0.1:{port}", state_dir=state)
    deadline = time.time() + 30
    while time.time() < deadline:
        status, body = http_get(proxy.metrics_port, "/readyz")
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200, body


def test_sigterm_during_load_loses_no_acknowledged_write(start_emulator, start_proxy):
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu, "--drain-timeout", "20")
    c = cluster(proxy.port)
    s = c.connect()
    s.execute("CREATE KEYSPACE drain WITH replication = {'class': 'SingleRegionStrategy'}")
    s.execute("CREATE TABLE drain.t (k int PRIMARY KEY, v text)")
    ins = s.prepare("INSERT INTO drain.t (k, v) VALUES (?, ?)")
    futures, acked, failed = [], [], []
    for i in range(3000):
        futures.append((i, s.execute_async(ins, (i, "v"))))
        if i == 1500:
            proxy.proc.send_signal(signal.SIGTERM)
    for i, f in futures:
        try:
            f.result()
            acked.append(i)
        except Exception:
            failed.append(i)
    c.shutdown()
    assert proxy.proc.wait(timeout=30) == 0, "the proxy drains and exits cleanly"
    assert acked, "writes were acknowledged before and during the drain"

    # Every acknowledged write is in Keyspaces: read them back through a fresh proxy.
    check = start_proxy(emu)
    c = cluster(check.port)
    try:
        s = c.connect()
        stored = {row.k for row in s.execute("SELECT k FROM drain.t")}
    finally:
        c.shutdown()
    missing = [k for k in acked if k not in stored]
    assert missing == [], f"{len(missing)} acknowledged writes missing"


def test_trace_logs_carry_no_secrets(start_emulator, start_proxy, aws_env):
    token = "FwoGZXIvYXdzSESSIONTOKENSECRET"
    emu = start_emulator("--credential", f"AKIDWITHTOKEN:token-secret-value:{token}", listen_on_peers=False)
    env = dict(aws_env, AWS_ACCESS_KEY_ID="AKIDWITHTOKEN", AWS_SECRET_ACCESS_KEY="token-secret-value",
               AWS_SESSION_TOKEN=token, RUST_LOG="trace")
    users = emu.state_dir.parent / "users"
    users.write_text("app:client-password-value\n")
    proxy = start_proxy(emu, "--client-auth", "password", "--client-credentials-file", str(users), env=env)
    from cassandra.auth import PlainTextAuthProvider

    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
    c = Cluster(["127.0.0.1"], port=proxy.port, auth_provider=PlainTextAuthProvider("app", "client-password-value"),
                execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        c.connect().execute("SELECT key FROM system.local")
    finally:
        c.shutdown()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.proc.wait(timeout=30)
    log = proxy.log_path.read_text()
    assert "TRACE" in log and len(log) > 1000, "trace logging was on"
    for secret in ["token-secret-value", token, "client-password-value", "signature="]:
        assert secret not in log, f"{secret!r} leaked into the logs"
    # A SigV4 signature is 64 hex digits; nothing of ours logs one. (rustls traces public
    # handshake randoms of that shape, so only the proxy's own lines are checked.)
    ours = "\n".join(line for line in log.splitlines() if "keyspaces_proxy" in line)
    assert ours, "the proxy's own trace lines are there"
    assert not re.search(r"\b[0-9a-f]{64}\b", ours), "something that looks like a signature was logged"
