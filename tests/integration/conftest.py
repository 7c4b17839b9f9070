"""Fixtures that run the real binaries: the Keyspaces emulator and keyspaces-proxy.

Everything listens on loopback. The AWS credential chain is pinned to static, throwaway values so
nothing can ever reach the instance metadata service or STS.
"""
import json
import os
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
    return env


def free_port():
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


@pytest.fixture
def start_proxy(processes, aws_env, tmp_path):
    def start(emulator, *extra, ca_file=None, server_name=SERVER_NAME, env=None):
        port = free_port()
        metrics_port = free_port()
        log_path = tmp_path / f"proxy-{port}.log"
        log = open(log_path, "w")
        args = [
            str(BIN_DIR / "keyspaces-proxy"),
            "--listen", f"127.0.0.1:{port}",
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--region", REGION,
            "--endpoint", f"{emulator.host}:{emulator.port}",
            "--tls-server-name", server_name,
            "--ca-file", ca_file or emulator.ca,
            *extra,
        ]
        proc = processes.start(args, env or aws_env, stderr=log)
        wait_for_port(port, proc)
        wait_for_port(metrics_port, proc)
        return Proxy(port, metrics_port, proc, log_path)

    return start


@pytest.fixture
def moto(processes, aws_env):
    """moto's AWS API emulator (KMS, STS) on loopback; its URL. Never AWS itself."""
    import sys

    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = processes.start([str(server), "-H", "127.0.0.1", "-p", str(port)], aws_env)
    wait_for_port(port, proc)
    return f"http://127.0.0.1:{port}", proc
