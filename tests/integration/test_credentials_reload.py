"""README, "Signals and reloads": SIGHUP "reloads AWS credentials". The proxy's own keys come
from a shared credentials file (a mounted Secret, say); after the file is rewritten and the
proxy sent SIGHUP, new upstream connections must be signed with the new key, and so must the
STS calls that assume a client identity's role (--identity-roles)."""
import os
import signal
import time

import pytest
from cassandra.cluster import Cluster

from fake_sts import FakeSts, emulator_credentials, role_credentials
from test_identity_roles import BILLING, ORDERS, ROLES, query_as, signing_keys, sigv4_auths

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


def sighup(proxy, logged, times=1):
    """Sends SIGHUP and waits until the log says `logged` for the `times`th time."""
    os.kill(proxy.proc.pid, signal.SIGHUP)
    deadline = time.time() + 10
    while proxy.log_path.read_text().count(logged) < times:
        assert time.time() < deadline, proxy.log_path.read_text()
        time.sleep(0.1)


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

    sighup(proxy, "AWS credentials reloaded")
    seen = len(signers(emu))
    assert connect_and_query(proxy.port)
    after = signers(emu)[seen:]
    assert after and set(after) == {NEW[0]}, after


@pytest.fixture
def sts():
    fake = FakeSts()
    yield fake
    fake.close()


def test_identity_roles_are_assumed_with_the_reloaded_base_key(start_emulator, start_proxy,
                                                               aws_env, tmp_path, sts):
    """The proxy's own key is what signs each identity's AssumeRole: after the key file is
    rotated and SIGHUP reloads it, an identity's first AssumeRole is signed with the new key,
    not the one the STS client's SDK config read at startup (which the rotation may revoke)."""
    credentials = tmp_path / "credentials"
    write_profile(credentials, OLD)
    env = {k: v for k, v in aws_env.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}  # the file is the source
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials)
    roles = tmp_path / "roles.toml"
    roles.write_text(ROLES)
    users = tmp_path / "users"
    users.write_text("orders:orders-pw\nbilling:billing-pw\n")
    # The proxy's own pool signs with OLD or NEW depending on when it connects: both are valid.
    emu = start_emulator("--credential", ":".join(OLD), "--credential", ":".join(NEW),
                         *emulator_credentials(ORDERS, BILLING), listen_on_peers=False)
    proxy = start_proxy(emu, "--profile", "proxy", "--client-auth", "password",
                        "--client-credentials-file", str(users), "--identity-roles", str(roles),
                        "--sts-endpoint", sts.url, env=env)

    assert query_as(proxy.port, "orders")
    assert [c["Signer"] for c in sts.calls_for(ORDERS)] == [OLD[0]]

    write_profile(credentials, NEW)
    sighup(proxy, "AWS credentials reloaded")

    # billing's first connection: its role is assumed only now, after the reload.
    seen = len(sigv4_auths(emu))
    assert query_as(proxy.port, "billing")
    assert [c["Signer"] for c in sts.calls_for(BILLING)] == [NEW[0]]
    # ...and the role's credentials STS issued reached Keyspaces (every signature verified).
    assert role_credentials(BILLING)[0] in signing_keys(emu, seen)[0]

    # orders keeps its pool and the role credentials it already holds: no new AssumeRole.
    assert query_as(proxy.port, "orders")
    assert len(sts.calls_for(ORDERS)) == 1


# The default, and filters that ask for the SDK's config-file events by name or by span.
@pytest.mark.parametrize("rust_log", [None, "info,aws_runtime::env_config::source=warn",
                                      "info,[load_config_file]=trace", "trace"])
def test_an_unreadable_rotation_is_reported_and_never_logs_the_secret(start_emulator, start_proxy,
                                                                       aws_env, tmp_path, rust_log):
    """A rewritten file the chain cannot use (not UTF-8, or empty keys): SIGHUP says the reload
    failed, the current keys go on signing, and the file's secret never reaches the log — the
    SDK's own warning about a non-UTF-8 file prints the whole file as a byte array."""
    credentials = tmp_path / "credentials"
    write_profile(credentials, OLD)
    env = {k: v for k, v in aws_env.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials)
    if rust_log:
        env["RUST_LOG"] = rust_log
    emu = start_emulator("--credential", ":".join(OLD), "--credential", ":".join(NEW),
                         listen_on_peers=False)
    proxy = start_proxy(emu, "--profile", "proxy", "--upstream-mode", "dedicated", env=env)
    assert connect_and_query(proxy.port)

    rotations = [
        b"# cl\xe9 rotated by ops\n[proxy]\naws_access_key_id = " + NEW[0].encode()
        + b"\naws_secret_access_key = " + NEW[1].encode() + b"\n",
        b"[proxy]\naws_access_key_id =\naws_secret_access_key =\n",
        b"[proxy]\naws_access_key_id = AKIDNBSP\naws_secret_access_key = \xc2\xa0\n",
    ]
    for n, content in enumerate(rotations, start=1):
        credentials.write_bytes(content)
        sighup(proxy, "SIGHUP: credential reload failed", times=n)
        seen = len(signers(emu))
        assert connect_and_query(proxy.port)
        assert set(signers(emu)[seen:]) == {OLD[0]}, "the current keys go on signing"

    log = proxy.log_path.read_text()
    assert "AWS credentials reloaded" not in log
    for secret in (OLD[1], NEW[1]):
        as_bytes = ", ".join(str(b) for b in secret.encode())
        assert secret not in log and as_bytes not in log, f"{secret} in the log"
