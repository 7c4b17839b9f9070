"""A hostile stand-in for KMS and STS on loopback: it counts every call and refuses each with
the AccessDenied answer AWS gives, ARNs and account id included — text no client of the proxy
may ever see."""
import threading
import time

import loopback_http

ACCOUNT = "123456789012"
KMS_DENIED = (
    '{"__type":"AccessDeniedException","message":"User: arn:aws:iam::%s:user/proxy is not '
    'authorized to perform: kms:Decrypt on resource: arn:aws:kms:us-east-1:%s:key/1234abcd"}'
    % (ACCOUNT, ACCOUNT)
)
STS_DENIED = (
    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
    '<Code>AccessDenied</Code><Message>User: arn:aws:sts::%s:assumed-role/proxy/i-0abc is not '
    'authorized to perform: sts:AssumeRole on resource: arn:aws:iam::%s:role/orders-keyspaces'
    '</Message></Error><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>'
    % (ACCOUNT, ACCOUNT)
)


class FakeAws:
    def __init__(self):
        self.calls = []  # (monotonic time, action)
        self.lock = threading.Lock()
        fake = self

        class Handler(loopback_http.Handler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                target = self.headers.get("x-amz-target", "")
                action = target.split(".")[-1] if target else "sts:" + (
                    body.decode(errors="replace").split("Action=")[-1].split("&")[0])
                with fake.lock:
                    fake.calls.append((time.monotonic(), action))
                if target:
                    status, ctype, reply = 400, "application/x-amz-json-1.1", KMS_DENIED
                else:
                    status, ctype, reply = 403, "text/xml", STS_DENIED
                self.reply(status, ctype, reply)

        self.http = loopback_http.Server(Handler)
        self.url = self.http.url

    def count(self, action):
        with self.lock:
            return sum(1 for _, a in self.calls if a == action)

    def times(self, action):
        with self.lock:
            return [t for t, a in self.calls if a == action]

    def close(self):
        self.http.close()
