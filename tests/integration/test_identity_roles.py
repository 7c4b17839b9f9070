"""Per-identity upstream credentials: a shared proxy signs each mapped client identity with its
own IAM role, assumed through STS (a fake on loopback that issues known keys), in a pool of its
own. The emulator knows exactly those keys and checks every signature: a connection signed with
anything but the secret STS issued for the identity's role fails."""
import os
import signal
import time

import pytest
from cassandra import AuthenticationFailed
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable

from conftest import AKID
from fake_sts import FakeSts, emulator_credentials, role_credentials

ORDERS = "arn:aws:iam::111122223333:role/orders-keyspaces"
BILLING = "arn:aws:iam::111122223333:role/billing-keyspaces"
BILLING_V2 = "arn:aws:iam::111122223333:role/billing-v2"
ROLES = f"""
[identities.orders]
role_arn = "{ORDERS}"

[identities.billing]
role_arn = "{BILLING}"
external_id = "billing-7f3a"
"""


@pytest.fixture
def sts():
    fake = FakeSts()
    yield fake
    fake.close()


def query_as(port, user):
    c = Cluster(["127.0.0.1"], port=port, protocol_version=4,
                auth_provider=PlainTextAuthProvider(user, f"{user}-pw"), connect_timeout=10)
    try:
        return c.connect().execute("SELECT release_version FROM system.local").one()
    finally:
        c.shutdown()


def sigv4_auths(emu):
    return [e for e in emu.events() if e.get("event") == "auth" and e.get("mode") == "sigv4"]


def signing_keys(emu, seen):
    """Access key ids of the upstream handshakes since `seen` events, all of which the emulator
    verified (key id, secret and session token)."""
    auths = sigv4_auths(emu)
    assert all(e["ok"] for e in auths), auths
    return [e["who"] for e in auths[seen:]], len(auths)


def shared_proxy(sts, start_emulator, start_proxy, tmp_path, *extra):
    """A password-authenticated proxy with ROLES mapped: (emulator, proxy, the roles file).
    The emulator accepts the proxy's own key and the keys STS issues for the roles, nothing
    else."""
    roles = tmp_path / "roles.toml"
    roles.write_text(ROLES)
    users = tmp_path / "users"
    users.write_text("orders:orders-pw\nbilling:billing-pw\nreporting:reporting-pw\n")
    emu = start_emulator(*emulator_credentials(ORDERS, BILLING, BILLING_V2), listen_on_peers=False)
    proxy = start_proxy(
        emu, "--client-auth", "password", "--client-credentials-file", str(users),
        "--identity-roles", str(roles), "--sts-endpoint", sts.url, *extra,
    )
    return emu, proxy, roles


def test_each_identity_signs_with_its_own_role(sts, start_emulator, start_proxy, tmp_path):
    emu, proxy, roles = shared_proxy(
        sts, start_emulator, start_proxy, tmp_path,
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
    # Mapped identities: fresh connections signed (and verified by the emulator) with exactly
    # the key STS issued for their role; unmapped clients share the proxy's own pool.
    assert keys["orders"] == {role_credentials(ORDERS)[0]}, keys
    assert keys["billing"] == {role_credentials(BILLING)[0]}, keys
    assert keys["reporting"] == set(), "no new upstream connection for an unmapped client"

    # What STS was asked: each role once, by the proxy's own identity, with the session name the
    # README documents (the identity) and the external id only where the mapping gives one.
    [orders_call] = sts.calls_for(ORDERS)
    [billing_call] = sts.calls_for(BILLING)
    assert orders_call["Signer"] == billing_call["Signer"] == AKID
    assert orders_call["RoleSessionName"] == "orders"
    assert "ExternalId" not in orders_call, orders_call
    assert billing_call["RoleSessionName"] == "billing"
    assert billing_call["ExternalId"] == "billing-7f3a"

    # A second connection of the same identity reuses its pool: no new upstream handshake.
    assert query_as(proxy.port, "orders")
    assert signing_keys(emu, seen)[0] == []

    # SIGHUP with billing mapped to another role: billing gets a new pool with that role's key.
    roles.write_text(ROLES.replace(BILLING, BILLING_V2))
    os.kill(proxy.proc.pid, signal.SIGHUP)
    deadline = time.time() + 10
    while "identity roles reloaded" not in proxy.log_path.read_text() and time.time() < deadline:
        time.sleep(0.1)
    assert query_as(proxy.port, "billing")
    new, seen = signing_keys(emu, seen)
    assert set(new) == {role_credentials(BILLING_V2)[0]}, new
    [v2_call] = sts.calls_for(BILLING_V2)
    assert (v2_call["RoleSessionName"], v2_call["ExternalId"]) == ("billing", "billing-7f3a")


def test_a_role_secret_keyspaces_does_not_know_fails(sts, start_emulator, start_proxy, tmp_path):
    """Negative control for the test above: STS hands orders the right key id with a wrong
    secret; the emulator refuses the signature, so orders cannot work, while billing can."""
    sts.wrong_secret_for.add(ORDERS)
    emu, proxy, _ = shared_proxy(sts, start_emulator, start_proxy, tmp_path)
    with pytest.raises(NoHostAvailable):
        query_as(proxy.port, "orders")
    refused = [e for e in sigv4_auths(emu) if e["who"] == role_credentials(ORDERS)[0]]
    assert refused and not any(e["ok"] for e in refused), refused
    assert {e["reason"] for e in refused} == {"invalid_signature"}
    assert query_as(proxy.port, "billing")


def test_unmapped_identities_are_refused_by_default(sts, start_emulator, start_proxy, tmp_path):
    """A shared proxy never lets an identity the mapping forgot act with the proxy's own role."""
    _, proxy, _ = shared_proxy(sts, start_emulator, start_proxy, tmp_path)
    assert query_as(proxy.port, "orders")
    with pytest.raises(NoHostAvailable) as err:
        query_as(proxy.port, "reporting")
    errors = list(err.value.errors.values())
    assert errors and isinstance(errors[0], AuthenticationFailed), errors
    assert "no role is configured for this identity" in str(errors[0])
    assert "arn:" not in str(errors[0]), "no internal details reach the client"


def test_a_reload_can_tighten_the_unmapped_policy(sts, start_emulator, start_proxy, tmp_path):
    """Switching the config file from proxy-credentials to deny and sending SIGHUP refuses
    unmapped identities from then on: a stale policy would fail open."""
    config = tmp_path / "proxy.toml"
    config.write_text('unmapped-identities = "proxy-credentials"\n')
    _, proxy, _ = shared_proxy(sts, start_emulator, start_proxy, tmp_path, "--config", str(config))
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
