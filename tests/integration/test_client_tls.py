"""TLS and mutual TLS on the client port, with the real Python driver and cqlsh: passwords over
TLS, certificate identities mapped to IAM roles (moto's STS), and clients that are refused."""
import ssl
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable

from conftest import AKID
from pki import Ca

ORDERS = "spiffe://test.example/ns/prod/sa/orders"
BILLING = "spiffe://test.example/ns/prod/sa/billing"
ROLES = f"""
[identities."{ORDERS}"]
role_arn = "arn:aws:iam::111122223333:role/orders-keyspaces"

[identities."{BILLING}"]
role_arn = "arn:aws:iam::111122223333:role/billing-keyspaces"
"""


@pytest.fixture
def pki(tmp_path):
    """The proxy's server certificate (for localhost and 127.0.0.1) and a separate client CA."""
    server_ca = Ca(tmp_path, "server")
    server = server_ca.issue("proxy", dns=["localhost"], ips=["127.0.0.1"], server=True)
    return server_ca, server, Ca(tmp_path, "clients")


def client_context(server_ca, cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(server_ca.pem)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def connect(port, ctx, auth=None):
    c = Cluster(["127.0.0.1"], port=port, protocol_version=4, ssl_context=ctx,
                ssl_options={"server_hostname": "localhost"}, auth_provider=auth, connect_timeout=10)
    return c, c.connect()


def tls_flags(server, clients=None):
    flags = ["--client-tls-cert", server[0], "--client-tls-key", server[1]]
    return flags + (["--client-ca", clients.pem] if clients else [])


def test_passwords_over_tls(start_emulator, start_proxy, pki, tmp_path):
    server_ca, server, _ = pki
    users = tmp_path / "users"
    users.write_text("app:app-pw\n")
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu, "--client-auth", "password", "--client-credentials-file", str(users),
                        *tls_flags(server))
    c, s = connect(proxy.port, client_context(server_ca), PlainTextAuthProvider("app", "app-pw"))
    try:
        assert s.execute("SELECT release_version FROM system.local").one()
    finally:
        c.shutdown()
    # A driver without TLS is refused with a reason it can show.
    plain = Cluster(["127.0.0.1"], port=proxy.port, protocol_version=4, connect_timeout=10,
                    auth_provider=PlainTextAuthProvider("app", "app-pw"))
    with pytest.raises(NoHostAvailable) as err:
        plain.connect()
    plain.shutdown()
    assert "requires TLS" in str(err.value)


def assumed_roles(emu, sts, seen):
    """The IAM roles behind the upstream handshakes since event `seen` (moto's STS names the
    role an access key was issued for): (role names, events seen). The proxy's own key (its
    shared pool warms up in the background) is left out."""
    auths = [e for e in emu.events() if e.get("event") == "auth" and e.get("mode") == "sigv4"]
    roles = set()
    for key in {e["who"] for e in auths[seen:]} - {AKID}:
        who = boto3.client("sts", endpoint_url=sts, region_name="us-east-1", aws_access_key_id=key,
                           aws_secret_access_key="unused-by-moto").get_caller_identity()
        roles.add(who["Arn"].split("/")[1] if ":assumed-role/" in who["Arn"] else who["Arn"])
    return roles, len(auths)


def test_certificate_identities_act_with_their_own_roles(moto, start_emulator, start_proxy, pki,
                                                         tmp_path):
    server_ca, server, clients = pki
    sts, _ = moto
    roles = tmp_path / "roles.toml"
    roles.write_text(ROLES)
    emu = start_emulator("--accept-unknown-keys", listen_on_peers=False)
    proxy = start_proxy(emu, "--client-auth", "mtls", *tls_flags(server, clients),
                        "--identity-roles", str(roles), "--sts-endpoint", sts)
    orders = clients.issue("orders", cn="billing", uris=[ORDERS])
    billing = clients.issue("billing", uris=[BILLING])
    seen, earlier = 0, set()
    for cert, role in [(orders, "orders-keyspaces"), (billing, "billing-keyspaces")]:
        c, s = connect(proxy.port, client_context(server_ca, cert))
        try:
            assert s.execute("SELECT release_version FROM system.local").one()
        finally:
            c.shutdown()
        used, seen = assumed_roles(emu, sts, seen)
        # Pools of identities served earlier may grow in the background meanwhile.
        assert role in used and used <= earlier | {role}, f"{cert[0]} acted as {used}"
        earlier.add(role)

    # A certificate the mapping does not know: refused (--unmapped-identities deny).
    stranger = clients.issue("reporting", uris=["spiffe://test.example/ns/prod/sa/reporting"])
    with pytest.raises(NoHostAvailable) as err:
        connect(proxy.port, client_context(server_ca, stranger))
    errors = list(err.value.errors.values())
    # Refused at STARTUP (there is no authenticator to fail), as Bad credentials with a reason.
    assert errors and "Bad credentials" in str(errors[0]), errors
    assert "no role is configured for this identity" in str(errors[0])
    assert "arn:" not in str(errors[0])
    # The right name from the wrong CA, or no certificate at all: no TLS session.
    impostor = Ca(tmp_path, "impostor").issue("impostor", uris=[ORDERS])
    for cert in [impostor, None]:
        with pytest.raises(NoHostAvailable):
            connect(proxy.port, client_context(server_ca, cert))
    assert assumed_roles(emu, sts, seen)[0] <= earlier, "no role for refused clients"


def test_cqlsh_over_mutual_tls(start_emulator, start_proxy, pki, tmp_path, aws_env):
    server_ca, server, clients = pki
    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu, "--client-auth", "mtls", *tls_flags(server, clients))
    cert, key = clients.issue("cqlsh-user", cn="cqlsh-user")
    rc = tmp_path / "cqlshrc"
    rc.write_text(f"[ssl]\ncertfile = {server_ca.pem}\nvalidate = true\n"
                  f"usercert = {cert}\nuserkey = {key}\n")
    cqlsh = Path(sys.executable).parent / "cqlsh"
    out = subprocess.run(
        [str(cqlsh), "127.0.0.1", str(proxy.port), "--ssl", "--cqlshrc", str(rc),
         "-e", "SELECT cluster_name FROM system.local"],
        env=aws_env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Amazon Keyspaces" in out.stdout
    # Without its client certificate cqlsh cannot connect.
    rc.write_text(f"[ssl]\ncertfile = {server_ca.pem}\nvalidate = true\n")
    out = subprocess.run(
        [str(cqlsh), "127.0.0.1", str(proxy.port), "--ssl", "--cqlshrc", str(rc),
         "-e", "SELECT cluster_name FROM system.local"],
        env=aws_env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
