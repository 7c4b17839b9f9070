#!/usr/bin/env python3
"""Sequential prepared reads with the real Python driver (cassandra-driver), one at a time,
against one address: prints the median and quartiles of the per-request latency as JSON.

  driver_latency.py --port P [--host 127.0.0.1] [--ca CA] [--sigv4 AKID:SECRET] [--requests N]

--ca: TLS to the target (the emulator directly); --sigv4: the official SigV4 plugin signs the
handshake (directly or through an L4 proxy); neither: plaintext without authentication (the
proxy). Run by benches/latency.sh under the venv the tests use."""
import argparse
import json
import ssl
import statistics
import time

from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import WhiteListRoundRobinPolicy

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--ca")
p.add_argument("--sigv4")
p.add_argument("--requests", type=int, default=2000)
a = p.parse_args()

kwargs = {}
if a.ca:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(a.ca)
    ctx.check_hostname = False
    kwargs["ssl_context"] = ctx
if a.sigv4:
    import boto3
    from cassandra_sigv4.auth import SigV4AuthProvider

    akid, secret = a.sigv4.split(":", 1)
    session = boto3.Session(aws_access_key_id=akid, aws_secret_access_key=secret, region_name="us-east-1")
    kwargs["auth_provider"] = SigV4AuthProvider(session)
profile = ExecutionProfile(
    consistency_level=ConsistencyLevel.LOCAL_QUORUM,
    load_balancing_policy=WhiteListRoundRobinPolicy([a.host]),
)
cluster = Cluster([a.host], port=a.port, protocol_version=4, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                  connect_timeout=10, **kwargs)
try:
    s = cluster.connect()
    s.execute("CREATE KEYSPACE IF NOT EXISTS drv WITH replication = {'class': 'SingleRegionStrategy'}")
    s.execute("CREATE TABLE IF NOT EXISTS drv.kv (k int PRIMARY KEY, v text)")
    s.execute("INSERT INTO drv.kv (k, v) VALUES (1, 'x')")
    read = s.prepare("SELECT v FROM drv.kv WHERE k = ?")
    for _ in range(200):  # warm-up
        s.execute(read, (1,))
    took = []
    for _ in range(a.requests):
        t = time.perf_counter_ns()
        s.execute(read, (1,))
        took.append((time.perf_counter_ns() - t) / 1000)
    q = statistics.quantiles(took, n=4)
    print(json.dumps({"p50_us": statistics.median(took), "p25_us": q[0], "p75_us": q[2], "requests": a.requests}))
finally:
    cluster.shutdown()
