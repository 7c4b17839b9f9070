"""kmsauth client authentication, interoperating with lyft's own Python `kmsauth` token generator.

KMS is moto's server on loopback (never AWS): the proxy decrypts tokens there with
`--kms-endpoint`, and the real `kmsauth.KMSTokenGenerator` makes them there too.
"""
import base64
import os

import boto3
import kmsauth
import pytest
from cassandra import AuthenticationFailed
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable

from conftest import REGION

TO = "keyspaces-proxy"


@pytest.fixture
def kms(moto, aws_env):
    url, proc = moto
    client = boto3.client("kms", region_name=REGION, endpoint_url=url,
                          aws_access_key_id=aws_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=aws_env["AWS_SECRET_ACCESS_KEY"])
    keys = {}
    for name in ["service", "user", "stranger"]:
        arn = client.create_key(Description=f"kmsauth {name}")["KeyMetadata"]["Arn"]
        client.create_alias(AliasName=f"alias/ksp-{name}", TargetKeyId=arn)
        keys[name] = arn

    class Kms:
        pass

    k = Kms()
    k.url, k.keys, k.proc = url, keys, proc
    return k


def token(kms, key, context, version=2, lifetime=10, env=None):
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "AKIDPYTEST")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "py-test-secret")
    gen = kmsauth.KMSTokenGenerator(key, context, REGION, token_version=version, token_cache_file="",
                                    token_lifetime=lifetime, endpoint_url=kms.url)
    return gen.get_username(), gen.get_token().decode()


def service(name="orders", to=TO, **extra):
    return {"from": name, "to": to, "user_type": "service", "env": "test", **extra}


def connect(port, username, password):
    c = Cluster(["127.0.0.1"], port=port, protocol_version=4,
                auth_provider=PlainTextAuthProvider(username, password), connect_timeout=10)
    session = c.connect()
    row = session.execute("SELECT release_version FROM system.local").one()
    c.shutdown()
    return row


def refused(port, username, password):
    with pytest.raises(NoHostAvailable) as e:
        connect(port, username, password)
    errors = list(e.value.errors.values())
    assert errors and isinstance(errors[0], AuthenticationFailed), errors
    return str(errors[0])


@pytest.fixture
def proxy(kms, start_emulator, start_proxy):
    emu = start_emulator(listen_on_peers=False)
    return start_proxy(
        emu, "--client-auth", "kmsauth", "--kmsauth-to", TO,
        "--kmsauth-service-key", "alias/ksp-service",
        "--kmsauth-user-key", kms.keys["user"],
        "--kmsauth-context", "env=test",
        "--kms-endpoint", kms.url,
        # These tests fail many logins on purpose, all from 127.0.0.1.
        "--login-failures-per-source", "1000", "--login-failures-per-user", "1000",
    )


def test_tokens_from_the_real_generator_are_accepted(kms, proxy):
    # v2 service token, made with the service key's alias.
    user, tok = token(kms, "alias/ksp-service", service())
    assert user == "2/service/orders"
    assert connect(proxy.port, user, tok).release_version
    # v2 user token with the user key; v1 (service, no user_type in the context).
    user, tok = token(kms, "alias/ksp-user", {"from": "alice", "to": TO, "user_type": "user", "env": "test"})
    assert user == "2/user/alice"
    assert connect(proxy.port, user, tok)
    user, tok = token(kms, "alias/ksp-service", {"from": "orders", "to": TO, "env": "test"}, version=1)
    assert user == "orders"
    assert connect(proxy.port, user, tok)


def test_forged_misaddressed_and_expired_tokens_are_refused(kms, proxy):
    # Addressed to another service.
    user, tok = token(kms, "alias/ksp-service", service(to="other-proxy"))
    assert "General error" in refused(proxy.port, user, tok)
    # Without the required extra context.
    user, tok = token(kms, "alias/ksp-service", {"from": "orders", "to": TO, "user_type": "service"})
    refused(proxy.port, user, tok)
    # A key not configured, and a user token made with the service key.
    user, tok = token(kms, "alias/ksp-stranger", service())
    assert "wrong KMS key" in refused(proxy.port, user, tok)
    user, tok = token(kms, "alias/ksp-service", {"from": "bob", "to": TO, "user_type": "user", "env": "test"})
    assert "wrong KMS key" in refused(proxy.port, user, tok)
    # Claiming to be someone else with a real token.
    user, tok = token(kms, "alias/ksp-service", service(name="orders"))
    refused(proxy.port, "2/service/payments", tok)
    # Expired (kmsauth backdates not_before by 3 minutes: a 2-minute token ended a minute ago),
    # and longer-lived than the proxy's 60-minute limit.
    user, tok = token(kms, "alias/ksp-service", service(), lifetime=2)
    assert "Invalid time validity" in refused(proxy.port, user, tok)
    user, tok = token(kms, "alias/ksp-service", service(), lifetime=120)
    assert "lifetime exceeded" in refused(proxy.port, user, tok)
    # Not a KMS ciphertext at all; a bad username.
    assert refused(proxy.port, "2/service/orders", base64.b64encode(b"forged" * 20).decode())
    assert "Unsupported username" in refused(proxy.port, "a/b", "x")


def test_other_spellings_of_an_identity_are_refused(kms, proxy):
    """A real token of 2/service/orders under another spelling of that name: never accepted
    (kmsauth's Python server reads 02 and +2 as 2), and a v1 name is another identity."""
    user, tok = token(kms, "alias/ksp-service", service())
    assert connect(proxy.port, user, tok), "the token itself is good (and now cached)"
    for spelling in ["02/service/orders", "+2/service/orders", "orders", "1/service/orders"]:
        refused(proxy.port, spelling, tok)


def test_validated_tokens_are_remembered_while_kms_is_down(kms, proxy):
    user, tok = token(kms, "alias/ksp-service", service())
    assert connect(proxy.port, user, tok)
    fresh_user, fresh = token(kms, "alias/ksp-service", service(name="billing"))
    kms.proc.terminate()
    kms.proc.wait(timeout=10)
    # The sliding session (and the token cache) need no KMS call; a new token does.
    assert connect(proxy.port, user, tok)
    assert "Failure connecting to AWS endpoint" in refused(proxy.port, fresh_user, fresh)
