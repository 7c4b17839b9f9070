"""Operating the proxy: metrics after real traffic, readiness, graceful shutdown, secret-free logs."""
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

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
    # Per endpoint address: every connection is on the emulator's own address, the one that
    # listens (its peers are listed but not listening).
    by_address = {k: v for k, v in after.items() if k.startswith("keyspaces_proxy_upstream_address_connections{")}
    own = f'keyspaces_proxy_upstream_address_connections{{address="{emu.host}:{emu.port}"}}'
    assert by_address.get(own, 0) >= 1, by_address
    assert sum(by_address.values()) == by_address[own], by_address
    assert after["keyspaces_proxy_credentials_expiry_seconds"] == float("inf")
    assert "keyspaces_proxy_upstream_tls_handshake_duration_seconds_bucket" in text
    # Bounded labels only: no query text, no client address (the endpoint's addresses, a dozen
    # at most, are the only addresses named).
    assert "INSERT" not in text
    assert not [l for l in text.splitlines() if "127.0.0.1" in l and "upstream_address_" not in l]
    assert http_get(proxy.metrics_port, "/livez")[0] == 200


def probe(proxy, path):
    from conftest import BIN_DIR

    return subprocess.run(
        [str(BIN_DIR / "keyspaces-proxy"), "--metrics-listen", f"127.0.0.1:{proxy.metrics_port}",
         "probe", "--path", path],
        capture_output=True, timeout=30,
    )


def test_readyz_follows_the_upstream(start_emulator, start_proxy, tmp_path):
    state = tmp_path / "flip-state"
    emu = start_emulator(listen_on_peers=False, state_dir=state)
    # Restarted on the port it was given, as Keyspaces' endpoint would come back.
    port = emu.port
    proxy = start_proxy(emu, "--pool-min-connections", "1")
    # /readyz never waits for Keyspaces: ready once the warm-up's connection is.
    deadline = time.time() + 30
    while time.time() < deadline:
        status, body = http_get(proxy.metrics_port, "/readyz")
        if status == 200:
            break
        assert json.loads(body)["reason"] == "connecting", body
        time.sleep(0.1)
    assert status == 200 and json.loads(body)["ready"] is True
    # The endpoint's addresses: the emulator's own and the peers it lists.
    addresses = json.loads(body)["addresses"]
    assert addresses["known"] >= 1 and 1 <= addresses["usable"] <= addresses["known"], addresses

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
    # The image's HEALTHCHECK: the binary probes its own endpoints (no shell or curl needed).
    assert probe(proxy, "/readyz").returncode == 1
    assert probe(proxy, "/livez").returncode == 0

    start_emulator(listen_on_peers=False, listen=f"127.0.0.1:{port}", state_dir=state)
    deadline = time.time() + 30
    while time.time() < deadline:
        status, body = http_get(proxy.metrics_port, "/readyz")
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200, body
    assert probe(proxy, "/readyz").returncode == 0


def test_readyz_never_waits_for_keyspaces(start_emulator, start_proxy):
    """An upstream that accepts TCP and never answers: /readyz reports "connecting" at once
    (kubelet's probe timeout is 1 s) instead of waiting out --connect-timeout."""
    import socket
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    from types import SimpleNamespace
    emu = start_emulator(listen_on_peers=False)
    upstream = SimpleNamespace(host="127.0.0.1", port=silent.getsockname()[1], ca=emu.ca)
    proxy = start_proxy(upstream, "--connect-timeout", "120")
    for _ in range(3):
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/livez", timeout=5):
            pass
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/readyz", timeout=5)
            raise AssertionError("ready without an upstream")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and json.loads(e.read())["reason"] == "connecting"
    silent.close()


def wait_until(condition, what, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.05)


def refuses_connections(port):
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except ConnectionRefusedError:
        return True


def metric(proxy, series):
    status, text = http_get(proxy.metrics_port, "/metrics")
    assert status == 200
    return samples(text).get(series, 0)


def freeze(proc):
    """SIGSTOP, and wait until every thread has stopped: a thread already running goes on
    serving until the kernel gets round to the signal, tens of milliseconds on a busy machine."""
    proc.send_signal(signal.SIGSTOP)

    def state(task):
        try:
            return Path(f"/proc/{proc.pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:  # a thread that has exited
            return "T"

    wait_until(lambda: all(state(t) == "T" for t in os.listdir(f"/proc/{proc.pid}/task")),
               "the emulator has stopped")


def stalled_writes(emu, proxy, count):
    """`count` writes the proxy has read and sent upstream, all unanswered: the emulator is
    stopped (SIGSTOP), an upstream that stalls for as long as the test needs, so what follows
    happens while they are in flight however slow the machine. (--latency-us would hold them
    only for a fixed time, and slow the driver's own connect queries by as much.) The caller
    resumes the emulator (SIGCONT)."""
    c = cluster(proxy.port)
    s = c.connect()
    s.execute("CREATE KEYSPACE drain WITH replication = {'class': 'SingleRegionStrategy'}")
    s.execute("CREATE TABLE drain.t (k int PRIMARY KEY, v text)")
    ins = s.prepare("INSERT INTO drain.t (k, v) VALUES (?, ?)")
    executes = lambda: metric(proxy, 'keyspaces_proxy_requests_total{opcode="EXECUTE"}')
    before = executes()
    freeze(emu.proc)
    futures = {k: s.execute_async(ins, (k, "in flight"), timeout=120) for k in range(count)}
    settled = set()  # answered or failed (a ResponseFuture has no done())
    for k, f in futures.items():
        f.add_callbacks(lambda _, k=k: settled.add(k), lambda _, k=k: settled.add(k))
    # Read by the proxy (counted as it reads a request) and waiting on an upstream stream.
    wait_until(lambda: executes() - before >= count, "the proxy has read every write")
    wait_until(lambda: metric(proxy, "keyspaces_proxy_upstream_streams_in_use") >= count,
               "every write is waiting upstream")
    assert not settled, "answered by a stopped upstream?"
    return c, futures, settled


def test_sigterm_answers_requests_in_flight_and_takes_no_new_work(start_emulator, start_proxy):
    """The first SIGTERM drains: /readyz says 503 (the load balancer stops sending), the port is
    closed (new clients go elsewhere), and every request already read is answered, its write
    stored, before the process exits 0."""
    emu = start_emulator(listen_on_peers=False)
    # Nothing here may expire on its own while the upstream is stopped.
    proxy = start_proxy(emu, "--drain-timeout", "120", "--request-timeout", "120")
    c, futures, settled = stalled_writes(emu, proxy, 20)
    try:
        proxy.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: http_get(proxy.metrics_port, "/readyz")[0] == 503, "/readyz says 503")
        assert json.loads(http_get(proxy.metrics_port, "/readyz")[1])["reason"] == "shutting_down"
        wait_until(lambda: refuses_connections(proxy.port), "the client port is closed")
        from cassandra.cluster import NoHostAvailable

        latecomer = cluster(proxy.port)
        with pytest.raises(NoHostAvailable):
            latecomer.connect()
        latecomer.shutdown()
        # All of that during the drain: the proxy waits for the writes the upstream holds.
        assert proxy.proc.poll() is None, "the proxy exited with writes in flight"
        assert not settled
    finally:
        emu.proc.send_signal(signal.SIGCONT)
    failed = {}
    for k, f in futures.items():
        try:
            f.result()
        except Exception as e:  # collected to name every failure in the assertion
            failed[k] = repr(e)
    c.shutdown()
    assert failed == {}, "requests in flight at SIGTERM failed instead of being answered"
    assert proxy.proc.wait(timeout=30) == 0, "the proxy drains and exits cleanly"
    assert "all client connections drained" in proxy.log_path.read_text()

    # Every acknowledged write is in Keyspaces: read them back through a fresh proxy.
    check = start_proxy(emu)
    c = cluster(check.port)
    try:
        stored = {row.k for row in c.connect().execute("SELECT k FROM drain.t")}
    finally:
        c.shutdown()
    assert stored == set(futures)


def test_a_second_sigterm_exits_at_once_with_requests_in_flight(start_emulator, start_proxy):
    """An operator who will not wait out the drain signals again: the process exits 130 now,
    and the requests still in flight fail (the client sees its connection close) rather than
    being answered."""
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu, "--drain-timeout", "120", "--request-timeout", "120")
    c, futures, _ = stalled_writes(emu, proxy, 5)
    try:
        proxy.proc.send_signal(signal.SIGTERM)
        # The first signal is handled before the second is sent: two signals sent back to back
        # can arrive as one.
        wait_until(lambda: "shutting down" in proxy.log_path.read_text(), "the drain began")
        proxy.proc.send_signal(signal.SIGTERM)
        # The upstream is still stopped: only an exit that does not wait for it ends the process.
        assert proxy.proc.wait(timeout=30) == 130
    finally:
        emu.proc.send_signal(signal.SIGCONT)
    from cassandra.cluster import NoHostAvailable
    from cassandra.connection import ConnectionShutdown

    # Each one's connection closed under it: not answered, and not failed any other way (an
    # error answer would mean the proxy was still serving).
    outcomes = {}
    for k, f in futures.items():
        try:
            outcomes[k] = f"answered: {f.result()!r}"
        except NoHostAvailable as e:
            if all(isinstance(why, ConnectionShutdown) for why in e.errors.values()):
                continue
            outcomes[k] = repr(e)
        except Exception as e:  # named in the assertion below
            outcomes[k] = repr(e)
    c.shutdown()
    assert outcomes == {}, "requests in flight were not cut off by the exit"
    assert "second signal: exiting now" in proxy.log_path.read_text()


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


def test_sighup_reloads_users_without_dropping_connections(start_emulator, start_proxy, tmp_path):
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import NoHostAvailable

    emu = start_emulator(listen_on_peers=False)
    users = tmp_path / "users"
    users.write_text("app:first-password\n")
    proxy = start_proxy(emu, "--client-auth", "password", "--client-credentials-file", str(users))
    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)

    def connect(user, password):
        c = Cluster(["127.0.0.1"], port=proxy.port, auth_provider=PlainTextAuthProvider(user, password),
                    execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=10)
        return c, c.connect()

    old_cluster, old_session = connect("app", "first-password")
    with pytest.raises(NoHostAvailable):
        connect("ops", "second-password")

    # app's password is rotated too: its session from before the reload must not outlive it.
    users.write_text("app:rotated-password\nops:second-password\n")
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 20
    new_cluster = None
    while time.time() < deadline:
        try:
            new_cluster, new_session = connect("ops", "second-password")
            break
        except NoHostAvailable:
            time.sleep(0.2)
    assert new_cluster is not None, "the reloaded user can connect"
    try:
        with pytest.raises(NoHostAvailable):
            connect("app", "first-password")
        rotated_cluster, _ = connect("app", "rotated-password")
        rotated_cluster.shutdown()
        assert new_session.execute("SELECT key FROM system.local").one().key == "local"
        # The connection opened before the reload is still in service.
        assert old_session.execute("SELECT key FROM system.local").one().key == "local"
    finally:
        new_cluster.shutdown()
        old_cluster.shutdown()
    assert proxy.proc.poll() is None, "SIGHUP does not stop the proxy"
    assert "client authentication reloaded" in proxy.log_path.read_text()


def test_config_file_and_print_config(tmp_path, aws_env):
    import subprocess
    from conftest import BIN_DIR

    cfg = tmp_path / "proxy.toml"
    cfg.write_text('region = "eu-west-1"\nmax-rate-per-connection = 700\nupstream-auth = "plain"\n'
                   'upstream-username = "svc"\nupstream-password = "do-not-print"\n')
    env = dict(aws_env, KEYSPACES_PROXY_MAX_RATE_PER_CONNECTION="900")
    out = subprocess.run([str(BIN_DIR / "keyspaces-proxy"), "--config", str(cfg), "--print-config", "--listen", "127.0.0.1:19999"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert 'region = "eu-west-1"' in text  # from the file
    assert "max-rate-per-connection = 900" in text  # the environment beats the file
    assert 'listen = "127.0.0.1:19999"' in text  # the flag beats both
    assert 'upstream-password = "****"' in text and "do-not-print" not in text
    cfg.write_text('regoin = "eu-west-1"\n')
    bad = subprocess.run([str(BIN_DIR / "keyspaces-proxy"), "--config", str(cfg), "--print-config"],
                         env=aws_env, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown key `regoin`" in bad.stderr


def test_dashboard_uses_only_exported_metrics(start_emulator, start_proxy):
    from pathlib import Path

    from conftest import ROOT

    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu)
    c = cluster(proxy.port)
    try:
        c.connect().execute("SELECT key FROM system.local")
    finally:
        c.shutdown()
    exported = set()
    for line in http_get(proxy.metrics_port, "/metrics")[1].splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            exported.add(name)
            if kind in ("counter",):
                exported.add(name + "_total")
            if kind == "histogram":
                exported.update({name + "_bucket", name + "_sum", name + "_count"})
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "keyspaces-proxy.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"keyspaces_proxy_[a-z_]+", target["expr"]))
    assert used and used <= exported, f"dashboard refers to unknown metrics: {used - exported}"


def test_a_rotated_secret_is_picked_up_without_a_signal(start_emulator, start_proxy, tmp_path):
    """A Kubernetes Secret volume: `users` is a symlink through `..data`, which the kubelet
    swaps to a new directory. The proxy sees the change on its own (distroless has no shell
    to send SIGHUP from): the new password works, the old one stops."""
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import NoHostAvailable

    volume = tmp_path / "secret"
    volume.mkdir()

    def publish(version, text):
        data = volume / f"..{version}"
        data.mkdir()
        (data / "users").write_text(text)
        link = volume / "..data_tmp"
        link.symlink_to(data.name)
        os.replace(link, volume / "..data")  # atomic, as the kubelet does

    publish("v1", "app:first-password\n")
    (volume / "users").symlink_to("..data/users")
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu, "--client-auth", "password", "--client-credentials-file",
                        str(volume / "users"))
    profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)

    def works(password):
        c = Cluster(["127.0.0.1"], port=proxy.port, auth_provider=PlainTextAuthProvider("app", password),
                    execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=10)
        try:
            c.connect()
            return True
        except NoHostAvailable:
            return False
        finally:
            c.shutdown()

    assert works("first-password")
    publish("v2", "app:second-password\n")
    deadline = time.time() + 20
    while "client authentication reloaded" not in proxy.log_path.read_text():
        assert time.time() < deadline, "the change was not picked up"
        time.sleep(0.1)
    assert works("second-password") and not works("first-password")
    # A plain file saved over it (an editor's save: write, then rename) and then edited in place
    # are picked up too.
    for password, change in [
        ("third-password", lambda t: ((volume / "new").write_text(t),
                                      os.replace(volume / "new", volume / "users"))),
        ("fourth-password", lambda t: (volume / "users").write_text(t)),
    ]:
        reloads = proxy.log_path.read_text().count("client authentication reloaded")
        change(f"app:{password}\n")
        deadline = time.time() + 20
        while proxy.log_path.read_text().count("client authentication reloaded") == reloads:
            assert time.time() < deadline, f"{password}: the change was not picked up"
            time.sleep(0.1)
        assert works(password)
    # The whole directory replaced (a watch follows the old directory's inode): the periodic
    # look finds it.
    fresh = tmp_path / "secret-new"
    fresh.mkdir()
    (fresh / "users").write_text("app:fifth-password\n")
    os.replace(volume, tmp_path / "secret-old")
    os.replace(fresh, volume)
    reloads = proxy.log_path.read_text().count("client authentication reloaded")
    deadline = time.time() + 30
    while proxy.log_path.read_text().count("client authentication reloaded") == reloads:
        assert time.time() < deadline, "the replaced directory was not picked up"
        time.sleep(0.2)
    assert works("fifth-password")


def test_the_open_file_limit_is_raised_to_the_hard_one(start_emulator, processes, aws_env, tmp_path):
    """A soft limit of 256 (hard 4096): the proxy raises it to 4096 at start and says so."""
    import resource
    from conftest import BIN_DIR, PROXY_LISTENING, wait_for_log

    emu = start_emulator(listen_on_peers=False)
    log = tmp_path / "proxy.log"
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    proc = subprocess.Popen(
        [str(BIN_DIR / "keyspaces-proxy"), "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", "--region", "us-east-1",
         "--endpoint", f"{emu.host}:{emu.port}", "--ca-file", emu.ca,
         "--tls-server-name", "cassandra.us-east-1.amazonaws.com"],
        env=aws_env, stderr=log.open("w"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    processes.procs.append(proc)
    wait_for_log(log, PROXY_LISTENING, proc, "keyspaces-proxy")
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)], line
    assert re.search(rf"open-file limit was=256 soft={hard} hard={hard}", log.read_text())


def test_out_of_descriptors_a_client_is_refused_at_once(start_emulator, processes, aws_env, tmp_path):
    """With every descriptor taken, a new client is closed at once and counted (it used to hang
    in the backlog while the accept loop logged EMFILE every 50 ms)."""
    import resource
    import socket
    from conftest import BIN_DIR, PROXY_LISTENING, wait_for_log

    emu = start_emulator(listen_on_peers=False)
    log = tmp_path / "proxy.log"
    proc = subprocess.Popen(
        [str(BIN_DIR / "keyspaces-proxy"), "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", "--region", "us-east-1",
         "--endpoint", f"{emu.host}:{emu.port}", "--ca-file", emu.ca,
         "--tls-server-name", "cassandra.us-east-1.amazonaws.com"],
        env=aws_env, stderr=log.open("w"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
    )
    processes.procs.append(proc)
    m = wait_for_log(log, PROXY_LISTENING, proc, "keyspaces-proxy")
    port, metrics = int(m.group(2)), int(m.group(4))
    held = []
    refused = None
    for _ in range(80):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(s)
        s.settimeout(0.2)
        try:
            if s.recv(1) == b"":
                refused = s
                break
        except socket.timeout:
            pass  # accepted and waiting for its STARTUP
    assert refused is not None, "no client was refused while descriptors ran out"
    for s in held:
        s.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        status, body = http_get(metrics, "/metrics")
        if samples(body).get('keyspaces_proxy_client_connections_rejected_total{reason="file_limit"}', 0) >= 1:
            break
        time.sleep(0.1)
    assert samples(body).get('keyspaces_proxy_client_connections_rejected_total{reason="file_limit"}', 0) >= 1


def test_the_images_health_check_follows_a_moved_metrics_port(start_emulator, processes, aws_env,
                                                             tmp_path):
    """The image's HEALTHCHECK (and ECS's) is a probe process of its own: with the metrics port
    moved in a config file named by KEYSPACES_PROXY_CONFIG, as the Dockerfile says to, the
    probe finds the server."""
    import json as _json
    from conftest import BIN_DIR, ROOT, free_port, wait_for_port

    defaults = ROOT / "deploy" / "image-defaults.toml"
    healthcheck = next(l for l in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
                       if l.strip().startswith("CMD ["))
    argv = _json.loads(healthcheck.strip()[len("CMD "):])
    emu = start_emulator(listen_on_peers=False)
    # Fixed ports on purpose: the probe process learns the metrics port from the config file
    # alone, so port 0 cannot be used here.
    port, metrics = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\nmetrics-listen = "127.0.0.1:{metrics}"\n'
                      f'endpoint = "{emu.host}:{emu.port}"\nca-file = "{emu.ca}"\n'
                      'tls-server-name = "cassandra.us-east-1.amazonaws.com"\nregion = "us-east-1"\n')
    env = dict(aws_env, KEYSPACES_PROXY_CONFIG=str(config))
    proc = subprocess.Popen([str(BIN_DIR / "keyspaces-proxy"), "--defaults", str(defaults)], env=env,
                            stderr=subprocess.DEVNULL)
    processes.procs.append(proc)
    wait_for_port(metrics, proc)
    check = [str(BIN_DIR / "keyspaces-proxy")] + [str(defaults) if a.endswith("defaults.toml") else a
                                                  for a in argv[1:]]
    assert subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0
