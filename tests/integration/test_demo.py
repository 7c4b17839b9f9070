"""The one-command demo as a newcomer meets it: keyspaces-demo starts, prints what to type next,
and exactly those commands work (cqlsh, the Python snippet, the metrics line). Its build must
reuse what the proxy's own build compiled."""
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from conftest import BIN_DIR, ROOT

CQLSH = Path(sys.executable).parent / "cqlsh"


def features(package):
    """{"name version": {features}} of a package's normal and build dependencies here."""
    out = subprocess.run(
        ["cargo", "tree", "--locked", "--offline", "-e", "normal,build", "-p", package,
         "--prefix", "none", "-f", "{p} {f}"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        feats = set(parts[-1].split(",")) if len(parts) > 2 and not parts[-1].startswith("(") else set()
        found.setdefault(f"{parts[0]} {parts[1]}", set()).update(feats)
    return found


def test_demo_build_reuses_the_proxy_build():
    """cargo unifies features per build: any crate the two share with other features would be
    compiled again for the demo, right after the README's first command built it."""
    proxy = features("keyspaces-proxy")
    demo = features("keyspaces-demo")
    drift = {k: sorted(demo[k] ^ proxy[k]) for k in proxy if k in demo and demo[k] != proxy[k]}
    assert not drift, f"keyspaces-demo: align these features in Cargo.toml: {drift}"
    # The emulator shares no code with the proxy, only crates: any feature it turns on that
    # the proxy does not would reach the demo's build of those crates.
    emulator = features("keyspaces-emulator")
    extra = {k: sorted(emulator[k] - proxy[k]) for k in proxy
             if k in emulator and emulator[k] - proxy[k]}
    assert not extra, f"keyspaces-emulator: features the proxy lacks: {extra}"


def start_demo(tmp_path):
    """The demo on ports it picks (port 0), and the ports it says it listens on."""
    out = tmp_path / "demo.out"
    env = dict(os.environ, KEYSPACES_PROXY_CLIENT_AUTH="password", KEYSPACES_PROXY_CLIENT_USER="a:b",
               AWS_PROFILE="not-there")
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [str(BIN_DIR / "keyspaces-demo"), "--listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0"],
            stdout=sink, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.time() + 60
        while "Ctrl-C stops the demo" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.time() < deadline, out.read_text()
            time.sleep(0.05)
        text = out.read_text()
        port = int(re.search(r"keyspaces-proxy listens on 127\.0\.0\.1:(\d+)", text).group(1))
        metrics = int(re.search(r"curl -s http://127\.0\.0\.1:(\d+)/metrics", text).group(1))
    except BaseException:
        # Not left running (and holding its ports) by a demo that never said where it listens.
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc, text, port, metrics


def test_demo_prints_commands_that_work(tmp_path):
    """The caller's KEYSPACES_PROXY_* and AWS_* settings cannot change the demo."""
    proc, text, port, metrics = start_demo(tmp_path)
    try:
        # The addresses bound, not the ones asked for: the commands below use what it printed.
        assert port != 0 and metrics != 0, text
        one_liner = re.search(r"^  (cqlsh .* -e .*)$", text, re.M).group(1)
        argv = shlex.split(one_liner)
        argv[0] = str(CQLSH)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "Amazon Keyspaces" in res.stdout and "us-east-1" in res.stdout, res.stdout

        # The interactive walk-through, typed as printed.
        session = re.search(rf"^  cqlsh 127\.0\.0\.1 {port}\n((?:    .*\n)+)", text, re.M).group(1)
        statements = "".join(line.strip() + "\n" for line in session.splitlines())
        res = subprocess.run([str(CQLSH), "127.0.0.1", str(port)], input=statements,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "error" not in res.stderr.lower(), res.stderr
        assert "hello" in res.stdout and "keyspaces" in res.stdout, res.stdout

        snippet = re.search(r"^  python3 -c '\n(.*?)'\n", text, re.M | re.S).group(1)
        res = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        assert "Amazon Keyspaces" in res.stdout, res.stdout

        curl_line = re.search(r"^  curl -s (\S+) \| grep (\S+)$", text, re.M)
        import urllib.request
        body = urllib.request.urlopen(curl_line.group(1), timeout=10).read().decode()
        assert curl_line.group(2) in body
        assert f"127.0.0.1:{metrics}" in curl_line.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
