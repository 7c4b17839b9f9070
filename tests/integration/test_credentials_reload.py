"""README, "Signals and reloads": SIGHUP "reloads AWS credentials". The proxy's own keys come
from a shared credentials file (a mounted Secret, say); after the file is rewritten and the
proxy sent SIGHUP, new upstream connections must be signed with the new key."""
import os
import signal
import time

from cassandra.cluster import Cluster

OLD = ("AKIDOLDFILEKEY", "old-file-secret")
NEW = ("AKIDNEWFILEKEY", "new-file-secret")


def write_profile(path, key):
    path.write_text(f"[proxy]\naws_access_key_id = {key[0]}\naws_secret_access_key = {key[1]}\n")


def connect_and_query(port):
    c = Cluster(["127.0.0.1"], port=port, protocol_version=4, connect_timeout=10)
    try:
        return c.connect().execute("SELECT release_version FROM system.local").one()
    finally:
        c.shutdown()


def signers(emu):
    auths = [e for e in emu.events() if e.get("event") == "auth" and e.get("mode") == "sigv4"]
    assert all(e["ok"] for e in auths), auths
    return [e["who"] for e in auths]


def test_sighup_reloads_credentials_from_the_shared_file(start_emulator, start_proxy, aws_env,
                                                         tmp_path):
    credentials = tmp_path / "credentials"
    write_profile(credentials, OLD)
    env = {k: v for k, v in aws_env.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}  # the file is the source
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials)
    emu = start_emulator("--credential", ":".join(OLD), "--credential", ":".join(NEW),
                         listen_on_peers=False)
    # Dedicated mode: every client connection opens (and signs) an upstream connection of its
    # own, so what signs after the reload is seen without waiting for a pool to recycle.
    proxy = start_proxy(emu, "--profile", "proxy", "--upstream-mode", "dedicated", env=env)
    assert connect_and_query(proxy.port)
    assert set(signers(emu)) == {OLD[0]}

    write_profile(credentials, NEW)
    # The rewritten file is valid: a proxy started now signs with the new key.
    seen = len(signers(emu))
    assert connect_and_query(start_proxy(emu, "--profile", "proxy", "--upstream-mode",
                                         "dedicated", env=env).port)
    assert set(signers(emu)[seen:]) == {NEW[0]}

    os.kill(proxy.proc.pid, signal.SIGHUP)
    deadline = time.time() + 10
    while "AWS credentials reloaded" not in proxy.log_path.read_text():
        assert time.time() < deadline, proxy.log_path.read_text()
        time.sleep(0.1)
    seen = len(signers(emu))
    assert connect_and_query(proxy.port)
    after = signers(emu)[seen:]
    assert after and set(after) == {NEW[0]}, after
