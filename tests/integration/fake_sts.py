"""A cooperative STS on loopback: AssumeRole succeeds with credentials derived from the role ARN
alone, so a test can start the Keyspaces emulator knowing every key (and secret, and session
token) the proxy will be given — and the emulator then checks each signature for real instead
of waving unknown keys through. Every AssumeRole call is recorded with what it asked for.

(fake_aws.FakeAws is the hostile counterpart: it refuses everything.)"""
import hashlib
import re
import threading
from urllib.parse import parse_qs

import loopback_http

# Far enough ahead that no refresh or recycle-before-expiry ever starts during a test.
EXPIRATION = "2099-01-01T00:00:00Z"


def role_credentials(role_arn):
    """(access key id, secret, session token) this STS issues for `role_arn`: distinct per role."""
    h = hashlib.sha256(role_arn.encode()).hexdigest().upper()
    return "ASIA" + h[:16], "sts-secret-" + h[16:40].lower(), "sts-token-" + h[40:].lower()


def emulator_credentials(*role_arns):
    """`--credential AKID:SECRET:TOKEN` arguments for the emulator, one per role."""
    args = []
    for arn in role_arns:
        args += ["--credential", ":".join(role_credentials(arn))]
    return args


class FakeSts:
    def __init__(self):
        # One dict per AssumeRole call: its form parameters, plus "Signer", the access key id
        # that signed the call.
        self.assume_role_calls = []
        # Role ARNs answered with the right key id but a secret only this STS knows.
        self.wrong_secret_for = set()
        self.lock = threading.Lock()
        fake = self

        class Handler(loopback_http.Handler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
                signer = re.search(r"Credential=([^/]+)/", self.headers.get("authorization", ""))
                if form.get("Action") != "AssumeRole":
                    return self.answer(400, ERROR % ("InvalidAction", form.get("Action")))
                with fake.lock:
                    fake.assume_role_calls.append({**form, "Signer": signer and signer.group(1)})
                    wrong = form.get("RoleArn") in fake.wrong_secret_for
                akid, secret, token = role_credentials(form.get("RoleArn", ""))
                if wrong:
                    secret = "not-the-secret-keyspaces-knows"
                name = form.get("RoleArn", "").rsplit("/", 1)[-1]
                session = form.get("RoleSessionName", "")
                self.answer(200, ASSUMED % (akid, secret, token, EXPIRATION, session, name, session))

            def answer(self, status, text):
                self.reply(status, "text/xml", text)

        self.http = loopback_http.Server(Handler)
        self.url = self.http.url

    def calls_for(self, role_arn):
        with self.lock:
            return [c for c in self.assume_role_calls if c.get("RoleArn") == role_arn]

    def close(self):
        self.http.close()


ASSUMED = """<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <Credentials>
      <AccessKeyId>%s</AccessKeyId>
      <SecretAccessKey>%s</SecretAccessKey>
      <SessionToken>%s</SessionToken>
      <Expiration>%s</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <AssumedRoleId>AROAFAKESTS0000000000:%s</AssumedRoleId>
      <Arn>arn:aws:sts::111122223333:assumed-role/%s/%s</Arn>
    </AssumedRoleUser>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ResponseMetadata>
</AssumeRoleResponse>"""

ERROR = """<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>
<Code>%s</Code><Message>%s</Message></Error><RequestId>0</RequestId></ErrorResponse>"""
