"""Per-identity upstream credentials: a shared proxy signs each mapped client identity with its
own IAM role, assumed through STS (moto's, on loopback), in a pool of its own."""
import os
import signal
import time

import pytest
from cassandra import AuthenticationFailed
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable

from conftest import AKID

ROLES = """
[identities.orders]
role_arn = "arn:aws:iam::111122223333:role/orders-keyspaces"

[identities.billing]
role_arn = "arn:aws:iam::111122223333:role/billing-keyspaces"
external_id = "billing-7f3a"
"""


def query_as(port, user):
    c = Cluster(["127.0.0.1"], port=port, protocol_version=4,
                auth_provider=PlainTextAuthProvider(user, f"{user}-pw"), connect_timeout=10)
    try:
        return c.connect().execute("SELECT release_version FROM system.local").one()
    finally:
        c.shutdown()


def signing_keys(emu, seen):
    """Access key ids of the upstream handshakes since `seen` events."""
    auths = [e for e in emu.events() if e.get("event") == "auth" and e.get("mode") == "sigv4"]
    assert all(e["ok"] for e in auths), auths
    return [e["who"] for e in auths[seen:]], len(auths)


def shared_proxy(moto, start_emulator, start_proxy, tmp_path, *extra):
    """A password-authenticated proxy with ROLES mapped (STS is moto's): (emulator, proxy,
    the roles file)."""
    sts, _ = moto
    roles = tmp_path / "roles.toml"
    roles.write_text(ROLES)
    users = tmp_path / "users"
    users.write_text("orders:orders-pw\nbilling:billing-pw\nreporting:reporting-pw\n")
    emu = start_emulator("--accept-unknown-keys", listen_on_peers=False)
    proxy = start_proxy(
        emu, "--client-auth", "password", "--client-credentials-file", str(users),
        "--identity-roles", str(roles), "--sts-endpoint", sts, *extra,
    )
    return emu, proxy, roles


def test_each_identity_signs_with_its_own_role(moto, start_emulator, start_proxy, tmp_path):
    emu, proxy, roles = shared_proxy(
        moto, start_emulator, start_proxy, tmp_path,
        "--pool-min-connections", "1", "--unmapped-identities", "proxy-credentials",
    )
    deadline = time.time() + 10
    while not signing_keys(emu, 0)[0] and time.time() < deadline:
        time.sleep(0.1)  # the shared pool warms up in the background
    own, seen = signing_keys(emu, 0)
    assert set(own) == {AKID}, "the shared pool signs as the proxy itself"

    keys = {}
    for user in ["orders", "billing", "reporting"]:
        assert query_as(proxy.port, user)
        new, seen = signing_keys(emu, seen)
        keys[user] = set(new)
    # Mapped identities: fresh connections signed with keys STS issued for their roles, one
    # identity's never reused by another; unmapped clients share the proxy's own pool.
    assert keys["orders"] and keys["billing"], keys
    assert AKID not in keys["orders"] | keys["billing"]
    assert not keys["orders"] & keys["billing"]
    assert keys["reporting"] == set(), "no new upstream connection for an unmapped client"

    # A second connection of the same identity reuses its pool: no new upstream handshake.
    assert query_as(proxy.port, "orders")
    assert signing_keys(emu, seen)[0] == []

    # SIGHUP with billing mapped to another role: billing gets a new pool with new keys.
    roles.write_text(ROLES.replace("billing-keyspaces", "billing-v2"))
    os.kill(proxy.proc.pid, signal.SIGHUP)
    deadline = time.time() + 10
    while "identity roles reloaded" not in proxy.log_path.read_text() and time.time() < deadline:
        time.sleep(0.1)
    assert query_as(proxy.port, "billing")
    new, seen = signing_keys(emu, seen)
    assert new and not set(new) & (keys["billing"] | keys["orders"] | {AKID})


def test_unmapped_identities_are_refused_by_default(moto, start_emulator, start_proxy, tmp_path):
    """A shared proxy never lets an identity the mapping forgot act with the proxy's own role."""
    _, proxy, _ = shared_proxy(moto, start_emulator, start_proxy, tmp_path)
    assert query_as(proxy.port, "orders")
    with pytest.raises(NoHostAvailable) as err:
        query_as(proxy.port, "reporting")
    errors = list(err.value.errors.values())
    assert errors and isinstance(errors[0], AuthenticationFailed), errors
    assert "no role is configured for this identity" in str(errors[0])
    assert "arn:" not in str(errors[0]), "no internal details reach the client"


def test_a_reload_can_tighten_the_unmapped_policy(moto, start_emulator, start_proxy, tmp_path):
    """Switching the config file from proxy-credentials to deny and sending SIGHUP refuses
    unmapped identities from then on: a stale policy would fail open."""
    config = tmp_path / "proxy.toml"
    config.write_text('unmapped-identities = "proxy-credentials"\n')
    _, proxy, _ = shared_proxy(moto, start_emulator, start_proxy, tmp_path, "--config", str(config))
    assert query_as(proxy.port, "reporting")
    config.write_text('unmapped-identities = "deny"\n')
    reloads = proxy.log_path.read_text().count("identity roles reloaded")
    os.kill(proxy.proc.pid, signal.SIGHUP)
    deadline = time.time() + 10
    while proxy.log_path.read_text().count("identity roles reloaded") == reloads:
        assert time.time() < deadline, "no reload"
        time.sleep(0.1)
    with pytest.raises(NoHostAvailable):
        query_as(proxy.port, "reporting")
    assert query_as(proxy.port, "orders")
