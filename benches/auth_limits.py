"""Pre-authentication limits, measured by hand (not part of the test suite): RSS with 100
clients each holding a maximal pre-auth frame, clients announcing 250 MiB, and how many
password guesses one source gets checked in 5 s. Run after `cargo build --workspace`:
    python3 benches/auth_limits.py
"""
import json, os, tempfile, socket, struct, subprocess, sys, time, threading
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import rawcql as cql
env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true", AWS_ACCESS_KEY_ID="AKIDTESTONLY",
           AWS_SECRET_ACCESS_KEY="test-only-secret", AWS_CONFIG_FILE="/tmp/awsnone",
           AWS_SHARED_CREDENTIALS_FILE="/tmp/awsnone", AWS_REGION="us-east-1")
B = os.path.join(ROOT, "target", "debug") + "/"
STATE = tempfile.mkdtemp()
emu = subprocess.Popen([B + "keyspaces-emulator", "--listen", "127.0.0.1:0", "--state-dir", STATE,
                        "--credential", "AKIDTESTONLY:test-only-secret", "--no-peer-listeners"], stdout=subprocess.PIPE, env=env)
info = json.loads(emu.stdout.readline())
port = 29655
log = subprocess.DEVNULL
proxy = subprocess.Popen([B + "keyspaces-proxy", "--listen", f"127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:29656",
    "--region", "us-east-1", "--endpoint", info["listen"], "--tls-server-name", "cassandra.us-east-1.amazonaws.com",
    "--ca-file", info["ca"], "--client-auth", "password", "--client-user", "app:app-pw"], env=env, stderr=log)
def rss():
    return int([l for l in open(f"/proc/{proxy.pid}/status") if l.startswith("VmRSS")][0].split()[1]) / 1024
try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close(); break
        except OSError:
            time.sleep(0.1)
    time.sleep(0.5)
    base = rss()
    # 1. 100 handshaking clients from four addresses (one may hold 64 handshake slots), each
    #    holding a maximal pre-auth frame (64 KiB announced, all but its last byte sent), then
    #    the same with 256 MiB announced.
    socks = []
    startup = struct.pack(">H", 1) + cql.string("CQL_VERSION") + cql.string("3.0.0")
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{2 + i % 4}", 0)); s.settimeout(10)
        s.sendall(cql.frame(0, cql.STARTUP, startup))
        s.recv(65536)
        body_len = 64 * 1024
        s.sendall(struct.pack(">BBhBi", 4, 0, 1, cql.AUTH_RESPONSE, body_len) + b"x" * (body_len - 1))
        socks.append(s)
    time.sleep(1)
    held = rss()
    print(f"pre-auth: {base:.1f} MB idle -> {held:.1f} MB with 100 clients each holding a 64 KiB frame ({(held - base):.1f} MB per 100)")
    for s in socks: s.close()
    socks = []
    refused = 0
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{2 + i % 4}", 0)); s.settimeout(10)
        s.sendall(cql.frame(0, cql.STARTUP, startup)); s.recv(65536)
        s.sendall(struct.pack(">BBhBi", 4, 0, 1, cql.AUTH_RESPONSE, 250 * 1024 * 1024) + b"x" * 65536)
        try:
            data = s.recv(65536)
            more = s.recv(65536)
            refused += (len(more) == 0)
        except OSError:
            refused += 1
        socks.append(s)
    print(f"250 MiB AUTH_RESPONSE announced by 100 clients: {refused} closed at once; RSS {rss():.1f} MB")
    for s in socks: s.close()
    # 2. Guessing: 4 connections' worth of threads from one source, guessing for 5 s.
    stop = time.time() + 5
    counts = {"checked": 0, "refused_unchecked": 0}
    lock = threading.Lock()
    def guesser():
        while time.time() < stop:
            c = cql.RawClient(port, timeout=10)
            try:
                c.call(0, cql.STARTUP, startup)
                token = b"\0app\0guess"
                _, op, body = c.call(0, cql.AUTH_RESPONSE, struct.pack(">i", len(token)) + token)
                msg = cql.message(0, body)
                with lock:
                    if b"too many failed logins" in msg: counts["refused_unchecked"] += 1
                    else: counts["checked"] += 1
            except (cql.Closed, OSError):
                pass
            finally:
                c.close()
    ts = [threading.Thread(target=guesser) for _ in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    print(f"guessing for 5 s from one source (4 threads): {counts['checked']} passwords checked, {counts['refused_unchecked']} refused unchecked")
finally:
    proxy.kill(); emu.kill()
    import shutil
    shutil.rmtree(STATE, ignore_errors=True)
