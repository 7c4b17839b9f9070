"""Fixtures that run the real binaries: the Keyspaces emulator and keyspaces-proxy.

Everything listens on loopback. The AWS credential chain is pinned to static, throwaway values so
nothing can ever reach the instance metadata service or STS.
"""
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("KSP_BIN_DIR", ROOT / "target" / "debug"))
AKID = "AKIDPYTEST"
SECRET = "py-test-secret"
REGION = "us-east-1"
SERVER_NAME = f"cassandra.{REGION}.amazonaws.com"

# The proxy reads every KEYSPACES_PROXY_* variable as a setting: one left in the caller's shell
# (a --listen, a --client-auth) would change every proxy, cqlsh and `--print-config` run here,
# those started without aws_env included. Tests that want one set it in their own env.
for _name in [n for n in os.environ if n.startswith("KEYSPACES_PROXY_")]:
    del os.environ[_name]
# The suite's own switches; no other KSP_* reaches the processes it starts.
KSP_KEPT = {"KSP_BIN_DIR", "KSP_REQUIRE_ALL_TOOLS", "KSP_VENV"}


@pytest.fixture(scope="session")
def aws_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("aws")
    (d / "config").write_text("")
    (d / "credentials").write_text("")
    env = dict(os.environ)
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID=AKID,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_CONFIG_FILE=str(d / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(d / "credentials"),
        AWS_REGION=REGION,
    )
    env.pop("AWS_SESSION_TOKEN", None)
    env.pop("AWS_PROFILE", None)
    # RUST_LOG=warn would hide the `listening on` line start_proxy learns the ports from.
    env.pop("RUST_LOG", None)
    for name in list(env):
        if name.startswith("KEYSPACES_PROXY_") or (name.startswith("KSP_") and name not in KSP_KEPT):
            del env[name]
    return env


def wait_for_log(path, pattern, proc, what, timeout=30):
    """The first match of `pattern` in the log a process writes; its log if it exits first."""
    deadline = time.time() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening:\n{text}")
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not say where it listens within {timeout}s:\n{text}")
        time.sleep(0.05)


def free_port():
    """A port free now, not when it is bound: another process may take it in between. Only for
    tests that need a port before starting a process that cannot report one it chose."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening after {timeout}s")


class Emulator:
    def __init__(self, proc, info, events_path, state_dir):
        self.proc = proc
        self.host, port = info["listen"].rsplit(":", 1)
        self.port = int(port)
        self.ca = info["ca"]
        self.peers = info["peers"]
        self.events_path = events_path
        self.state_dir = state_dir

    def events(self):
        if not self.events_path.exists():
            return []
        # Complete lines only: the emulator may be writing the next one right now.
        lines = self.events_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]


class Processes:
    def __init__(self):
        self.procs = []

    def start(self, args, env, **kw):
        p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=kw.pop("stderr", subprocess.DEVNULL), text=True, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def processes():
    ps = Processes()
    yield ps
    ps.stop_all()


@pytest.fixture
def start_emulator(processes, aws_env, tmp_path):
    def start(*extra, state_dir=None, listen_on_peers=True, listen="127.0.0.1:0"):
        state_dir = state_dir or (tmp_path / "emulator-state")
        events = tmp_path / f"events-{len(processes.procs)}.jsonl"
        args = [
            str(BIN_DIR / "keyspaces-emulator"),
            "--listen", listen,
            "--state-dir", str(state_dir),
            "--region", REGION,
            "--credential", f"{AKID}:{SECRET}",
            "--plain-user", "svc-user:svc-pass",
            "--event-log", str(events),
            *extra,
        ]
        if not listen_on_peers:
            args.append("--no-peer-listeners")
        proc = processes.start(args, aws_env)
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("emulator did not start")
        return Emulator(proc, json.loads(line), events, state_dir)

    return start


class Proxy:
    """A running keyspaces-proxy: its client port, metrics port, process and log."""

    def __init__(self, port, metrics_port, proc, log_path):
        self.port, self.metrics_port, self.proc, self.log_path = port, metrics_port, proc, log_path


# The proxy's startup line (src/app.rs, `run`), text or JSON log: both addresses, each followed by
# a space or a quote so a line still being written cannot yield a cut-off port.
PROXY_LISTENING = re.compile(
    r"listening on (\S+):(\d+) for CQL clients .*?; /metrics, /livez, /readyz on ([^\s\"]+):(\d+)[\s\"]")


@pytest.fixture
def start_proxy(processes, aws_env, tmp_path):
    def start(emulator, *extra, ca_file=None, server_name=SERVER_NAME, env=None):
        # Port 0 and the proxy's own report of what it bound: a port picked here and bound
        # later could be taken by another process in between.
        log_path = tmp_path / f"proxy-{len(processes.procs)}.log"
        args = [
            str(BIN_DIR / "keyspaces-proxy"),
            "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--region", REGION,
            "--endpoint", f"{emulator.host}:{emulator.port}",
            "--tls-server-name", server_name,
            "--ca-file", ca_file or emulator.ca,
            *extra,
        ]
        with open(log_path, "w") as log:
            proc = processes.start(args, env or aws_env, stderr=log)
        m = wait_for_log(log_path, PROXY_LISTENING, proc, "keyspaces-proxy")
        return Proxy(int(m.group(2)), int(m.group(4)), proc, log_path)

    return start


@pytest.fixture
def moto(processes, aws_env, tmp_path):
    """moto's AWS API emulator (KMS, STS) on loopback; its URL. Never AWS itself."""
    import sys

    server = Path(sys.executable).parent / "moto_server"
    # Port 0: werkzeug logs the port it bound ("Running on http://127.0.0.1:N") on stderr, with
    # a line per request after it, hence a file rather than a pipe nobody drains.
    log_path = tmp_path / f"moto-{len(processes.procs)}.log"
    with open(log_path, "w") as log:
        proc = processes.start([str(server), "-H", "127.0.0.1", "-p", "0"], aws_env, stderr=log)
    port = int(wait_for_log(log_path, r"Running on http://127\.0\.0\.1:(\d+)\s", proc, "moto_server").group(1))
    return f"http://127.0.0.1:{port}", proc


# test_deploy.py's skip reason when a deploy/ checker is not installed.
MISSING_CHECKER = "deploy checker missing: "


def pytest_terminal_summary(terminalreporter):
    """A missing checker is a skip locally (CI fails instead): say so where nobody misses it."""
    missing = []
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if MISSING_CHECKER in reason:
            missing.append(f"{report.nodeid}: {reason.split(MISSING_CHECKER, 1)[1]}")
    if missing:
        terminalreporter.write_sep("!", f"{len(missing)} deploy/ check(s) NOT RUN: checker missing",
                                   red=True, bold=True)
        for line in missing:
            terminalreporter.write_line(line, yellow=True)
        terminalreporter.write_line("CI runs them all (KSP_REQUIRE_ALL_TOOLS=1 turns a missing checker into a failure).")
