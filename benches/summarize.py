#!/usr/bin/env python3
"""Summarises benches/compare.sh results: medians, ratios against the goals, and an SVG plot of
latency against throughput. Standard library only."""
import json
import statistics
import sys
from pathlib import Path

results, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
runs = [r for r in rows if r.get("path") != "memory"]
memory = next((r for r in rows if r.get("path") == "memory"), None)


def med(path, label, f):
    vals = [f(r) for r in runs if r["path"] == path and r["label"] == label]
    return statistics.median(vals) if vals else float("nan")


def levels(path):
    return sorted({r["label"] for r in runs if r["path"] == path and r["label"].startswith("saturation")})


def saturation(path):
    """The level at which `path` peaks: its saturation point (median throughput over rounds)."""
    return max(levels(path), key=lambda label: med(path, label, lambda r: r["throughput_rps"]))


def rps(path, label=None):
    return med(path, label or saturation(path), lambda r: r["throughput_rps"])


def p50(path, label="sequential"):
    return med(path, label, lambda r: r["latency_us"]["p50"])


def p99(path, label=None):
    return med(path, label or saturation(path), lambda r: r["latency_us"]["p99"])


WARMUP_S = 1.0  # keyspaces-load's default warm-up, run before the measured window


def cpu_per_req(path, label=None):
    # The middlebox's CPU is read around the whole run, warm-up included: count those requests.
    def one(r):
        carried = r["requests"] * (r["duration_s"] + WARMUP_S) / r["duration_s"]
        return 1e6 * r["cpu_s"] / max(carried, 1)
    return med(path, label or saturation(path), one)


fixed = [r for r in runs if r["label"] == "fixed-rate"]
fixed_rate = f"{statistics.median(r['throughput_rps'] for r in fixed) / 1000:.0f}k req/s" if fixed else "—"


def level_name(label):
    c, n = label.removeprefix("saturation-").split("x")
    return f"{c}×{n}"


lines = []
n = len([r for r in runs if r["path"] == "direct_tls" and r["label"] == "sequential"])
tried = ", ".join(level_name(label) for label in levels("direct_tls"))
lines.append(f"Medians of {n} interleaved rounds; prepared single-row reads. Saturation: each path at the level (connections × in flight: {tried}) where its median throughput peaks; sequential: 1 connection, 1 in flight.\n")
for mode in ["tls", "plain"]:
    title = "TLS to the emulator" if mode == "tls" else "plaintext upstream (benchmark-only flags, loopback)"
    lines.append(f"\n**{title}**\n")
    lines.append(f"| path | req/s at saturation | at | × direct | p99 at saturation (µs) | p50 sequential (µs) | added p50 (µs) | middlebox CPU µs/request at saturation | … at {fixed_rate} |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    d = f"direct_{mode}"
    for p in [d, f"haproxy_{mode}", f"proxy_{mode}"]:
        name = {"direct": "emulator directly", "haproxy": "haproxy (TCP mode)", "proxy": "keyspaces-proxy"}[p.split("_")[0]]
        added = "—" if p == d else f"{p50(p) - p50(d):.0f}"
        cpu = "—" if p == d else f"{cpu_per_req(p):.2f}"
        cpu_fixed = "—" if p == d or not fixed else f"{cpu_per_req(p, 'fixed-rate'):.2f}"
        lines.append(f"| {name} | {rps(p):,.0f} | {level_name(saturation(p))} | {rps(p) / rps(d):.2f} | {p99(p):,.0f} | {p50(p):.0f} | {added} | {cpu} | {cpu_fixed} |")

goals = []
for mode in ["tls", "plain"]:
    d, h, k = f"direct_{mode}", f"haproxy_{mode}", f"proxy_{mode}"
    ratio = rps(k) / rps(d)
    goals.append((f"throughput ≥ 0.95× direct ({mode})", f"{ratio:.2f}×", ratio >= 0.95))
    added_k, added_h = p50(k) - p50(d), p50(h) - p50(d)
    goals.append((f"added p50 ≤ haproxy's ({mode})", f"{added_k:.0f} µs vs {added_h:.0f} µs", added_k <= added_h))
if fixed:
    cpu_ratio = cpu_per_req("proxy_tls", "fixed-rate") / cpu_per_req("haproxy_tls", "fixed-rate")
    goals.append((f"CPU/request ≤ 1.5× haproxy's (TLS upstream, same traffic: {fixed_rate})", f"{cpu_ratio:.2f}×", cpu_ratio <= 1.5))
cpu_ratio = cpu_per_req("proxy_tls") / cpu_per_req("haproxy_tls")
goals.append(("CPU/request ≤ 1.5× haproxy's (TLS upstream, each at its saturation)", f"{cpu_ratio:.2f}×", cpu_ratio <= 1.5))
if memory:
    idle, held = memory["proxy_idle_rss_kb"] / 1024, memory["proxy_10k_idle_rss_kb"] / 1024
    goals.append(("RSS idle ≤ 20 MB", f"{idle:.1f} MB", idle <= 20))
    goals.append((f"RSS with {memory['held']['held']:,} idle clients ≤ 100 MB", f"{held:.1f} MB", held <= 100))
# Where the CPU goes at saturation: the two cores are shared, so a middlebox's CPU is taken from
# the client and the server.
if all("emulator_cpu_s" in r for r in runs):
    lines.append("\n**CPU per request at saturation, by process (TLS; µs, warm-up included)**\n")
    lines.append("| path | client | emulator | middlebox | total |")
    lines.append("|---|---|---|---|---|")
    for p in ["direct_tls", "haproxy_tls", "proxy_tls"]:
        def per(key, p=p):
            return med(p, saturation(p), lambda r: 1e6 * r[key] / (r["requests"] * (r["duration_s"] + WARMUP_S) / r["duration_s"]))
        client, emu = per("client_cpu_s"), per("emulator_cpu_s")
        mid = 0.0 if p.startswith("direct") else cpu_per_req(p)
        name = {"direct": "emulator directly", "haproxy": "haproxy (TCP mode)", "proxy": "keyspaces-proxy"}[p.split("_")[0]]
        lines.append(f"| {name} | {client:.2f} | {emu:.2f} | {'—' if p.startswith('direct') else f'{mid:.2f}'} | {client + emu + mid:.2f} |")

lines.append("\n| goal | measured | met |")
lines.append("|---|---|---|")
for g, m, ok in goals:
    lines.append(f"| {g} | {m} | {'yes' if ok else 'no'} |")
summary = "\n".join(lines) + "\n"
(out / "summary.md").write_text(summary)
print(summary)

# Latency against throughput, from the concurrency sweep.
sweep = {}
for r in runs:
    if r["label"].startswith("sweep-"):
        sweep.setdefault(r["path"], []).append((r["throughput_rps"], r["latency_us"]["p50"], r["latency_us"]["p99"]))
if sweep:
    W, H, L, B, T, R = 760, 440, 70, 50, 30, 180
    xmax = max(x for pts in sweep.values() for x, _, _ in pts) * 1.05
    ymax = max(y for pts in sweep.values() for _, _, y in pts) * 1.05
    sx = lambda x: L + (W - L - R) * x / xmax
    sy = lambda y: H - B - (H - B - T) * y / ymax
    colors = {"direct_tls": "#1f77b4", "haproxy_tls": "#ff7f0e", "proxy_tls": "#2ca02c"}
    names = {"direct_tls": "emulator directly (TLS)", "haproxy_tls": "haproxy TCP → TLS", "proxy_tls": "keyspaces-proxy → TLS"}
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2 - 120}" y="18" font-size="14">Latency vs throughput (2 connections, 1–128 in flight)</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(W - R) / 2}" y="{H - 12}">throughput (requests/s)</text>',
           f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})">latency (µs)</text>']
    for i in range(6):
        xv, yv = xmax * i / 5, ymax * i / 5
        svg.append(f'<text x="{sx(xv) - 15}" y="{H - B + 16}">{xv / 1000:.0f}k</text>')
        svg.append(f'<text x="{L - 45}" y="{sy(yv) + 4}">{yv:.0f}</text>')
        svg.append(f'<line x1="{L}" y1="{sy(yv)}" x2="{W - R}" y2="{sy(yv)}" stroke="#eee"/>')
    for k, (path, pts) in enumerate(sorted(sweep.items())):
        pts.sort()
        c = colors.get(path, "gray")
        for idx, dash in [(1, ""), (2, ' stroke-dasharray="5,4"')]:
            d = " ".join(f"{sx(p[0]):.1f},{sy(p[idx]):.1f}" for p in pts)
            svg.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        y = T + 20 + 40 * k
        svg.append(f'<line x1="{W - R + 10}" y1="{y}" x2="{W - R + 30}" y2="{y}" stroke="{c}" stroke-width="2"/>')
        svg.append(f'<text x="{W - R + 35}" y="{y + 4}">{names.get(path, path)}</text>')
    svg.append(f'<text x="{W - R + 10}" y="{T + 150}">solid: p50, dashed: p99</text>')
    svg.append("</svg>")
    (out / "latency-throughput.svg").write_text("\n".join(svg))
