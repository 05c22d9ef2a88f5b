#!/usr/bin/env python3
"""How fast a blocked veil client works again, and what the CDN way costs; one run.

In the namespaces of tests/netns/blocklab.py (client, a middle, the server with veil on
10.198.0.2:8443 and nginx as a CDN on 10.198.0.3:443):

1. **Block to working again.** With the lab censor in the middle and a download running
   through the client's forward, the censor blocks the server (``rst``: forged RSTs on every
   connection to its port; ``blackhole``: every packet to or from its address dropped). The
   figure is the time from the censor applying the rule to the first success of a 1 MiB
   download started every 0.5 s (a user clicking again); then the block lifts and the client
   is timed back to the direct way. Median of ``--runs`` per block kind.
2. **The CDN way vs the direct way.** With a kernel bridge in the middle instead (nothing in
   the way), one client on the direct way and one whose key's direct address refuses (so it
   uses the CDN way): throughput (``curl`` of ``--mib`` MiB through the forward) and time to
   first byte (bench/probe.py ttfb: fresh SOCKS5 connections, GET /1k), and the same for
   v2ray vmess+ws behind the same nginx (Debian's v2ray), the Xray-style peer. Printed as
   ratios.

Run as root, from the repository, in the project's environment::

    PYTHONPATH=src python3 bench/blocking.py [--runs 10] [--kinds rst,blackhole]
        [--keepalive 1:1] [--mib 128] [--ttfb-count 50] [--no-v2ray] [--no-blocks]
        [--no-paths] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from tests.netns.blocklab import (  # noqa: E402
    CDN_IP,
    CDN_NAME,
    FORWARD_PORT,
    HUGE_SIZE,
    SERVER_IP,
    SERVER_PORT,
    SOCKS_PORT,
    SWITCHED_AWAY,
    SWITCHED_BACK,
    BlockLab,
)
from tests.netns.topology import Proc  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

BLOCKS = {
    "rst": f"block-port {SERVER_PORT}\ninject-rst\n",
    "blackhole": f"block-ip {SERVER_IP}\n",
}
# A run that has not worked again after this long counts as "never" (the default keepalive's
# blackhole takes ~30 s).
WORKING_WITHIN_S = 90.0
# The prober's waits grow to 60 s (FailoverConfig.probe_max) x 1.5: back within this or never.
BACK_WITHIN_S = 120.0
# The v2ray peer: its WebSocket path behind the CDN, and its ports in the namespaces.
V2RAY_PATH = "/vm-ws/"
V2RAY_SERVER_PORT = 10000
V2RAY_FORWARD_PORT = 8081
V2RAY_SOCKS_PORT = 1081
V2RAY_LOCATION = f"""        location {V2RAY_PATH} {{
            proxy_pass http://127.0.0.1:{V2RAY_SERVER_PORT};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 100s;
        }}
"""
# Python start-up, v2ray's start, a first handshake: up within this, on a busy box.
UP_S = 30.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


# ------------------------------------------------------------------ 1. block to working
def switched_back(lab: BlockLab, mark: int) -> bool:
    return SWITCHED_BACK.search(lab.log_since(mark)) is not None


def block_runs(lab: BlockLab, kind: str, runs: int) -> dict[str, Any]:
    working: list[float] = []
    back: list[float] = []
    never = 0
    for run in range(runs):
        lab.set_rules("")
        if run:
            # Each run is a client with no history: a way blocked again within minutes of
            # its return waits 4x longer before the next return (FailoverConfig's relapse
            # rule, against a censor that freezes every new connection), which would
            # stretch each run's return and time that rule instead of one block.
            lab.restart_client()
        wait_until(lambda: lab.carrier_of_next(4.0) == SERVER_IP, BACK_WITHIN_S,
                   "the client on the direct way", poll=0.2)
        running = lab.start("client", "curl-running", lab.curl_argv(
            "huge.bin", "/dev/null", 300, "--limit-rate", "2M"))
        try:
            wait_until(lambda: lab.received()[SERVER_IP] > 2 * 1024 * 1024, 10,
                       "the running download under way")
            mark = lab.log_mark()
            blocked = lab.set_rules(BLOCKS[kind])
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    working.append(round(lab.time_to_working(blocked, WORKING_WITHIN_S), 2))
            except AssertionError:
                never += 1
            switched = SWITCHED_AWAY.search(lab.log_since(mark))
        finally:
            lab.stop(running)
        mark = lab.log_mark()
        lifted = lab.set_rules("")
        try:
            wait_until(functools.partial(switched_back, lab, mark), BACK_WITHIN_S,
                       "back on the direct way", poll=0.1)
            back.append(round(time.monotonic() - lifted, 2))
        except AssertionError:
            pass
        log(f"  {kind} run {run + 1}: working again {working[-1] if working else '-'} s; "
            f"switch: {switched.group(0) if switched else 'none'}; back "
            f"{back[-1] if back else '-'} s after the lift")
    return {"working_again_s": working, "median_working_again_s": median(working),
            "never_within_s": WORKING_WITHIN_S if never else None, "never": never,
            "back_after_lift_s": back, "median_back_s": median(back)}


# ------------------------------------------------------------------ 2. the paths compared
def throughput(lab: BlockLab, forward_port: int, mib: int) -> dict[str, float]:
    """``mib`` MiB through a forward (or straight to the server, port 80); Mbit/s and the
    time to the first byte of the response."""
    size = mib * 1024 * 1024
    assert size <= HUGE_SIZE
    host = f"127.0.0.1:{forward_port}" if forward_port else f"{SERVER_IP}:80"
    out = lab.exec("client", "curl", "-sS", "--max-time", "120", "-o", "/dev/null",
                   "-r", f"0-{size - 1}", "-w", "%{size_download} %{time_total} "
                   "%{time_starttransfer}", f"http://{host}/huge.bin", timeout=130)
    got, total, first = out.stdout.split()
    if int(got) != size:
        raise RuntimeError(f"{host}: {got} of {size} bytes")
    return {"mbit_s": round(size * 8 / float(total) / 1e6, 1),
            "first_byte_ms": round(float(first) * 1000, 1)}


def ttfb(lab: BlockLab, socks_port: int | None, count: int) -> float:
    """bench/probe.py ttfb: median ms to the 1 KiB body, each on a fresh connection."""
    argv = [sys.executable, str(BENCH_DIR / "probe.py"), "ttfb", "--target",
            f"{SERVER_IP if socks_port is None else '127.0.0.1'}:80", "--count", str(count)]
    if socks_port is not None:
        argv += ["--socks", f"127.0.0.1:{socks_port}"]
    out = lab.exec("client", *argv, timeout=60 + count * 2.0)
    body = json.loads(out.stdout)["body_ms"]
    if not body:
        raise RuntimeError(f"no TTFB connection worked: {out.stdout[-500:]}")
    return round(float(statistics.median(body)), 2)


def measure(lab: BlockLab, name: str, forward: int, socks: int | None, mib: int,
            count: int) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, **throughput(lab, forward, mib)}
    row["ttfb_ms"] = ttfb(lab, socks, count)
    log(f"  {name}: {row}")
    return row


def v2ray_configs(work: Path, ca_file: Path) -> tuple[Path, Path]:
    user = str(uuid.uuid4())
    quiet = {"loglevel": "warning", "access": "none"}
    server = {"log": quiet, "inbounds": [{
        "listen": "127.0.0.1", "port": V2RAY_SERVER_PORT, "protocol": "vmess",
        "settings": {"clients": [{"id": user, "alterId": 0}]},
        "streamSettings": {"network": "ws", "wsSettings": {"path": V2RAY_PATH}}}],
        "outbounds": [{"protocol": "freedom"}]}
    client = {"log": quiet, "inbounds": [
        {"listen": "127.0.0.1", "port": V2RAY_FORWARD_PORT, "protocol": "dokodemo-door",
         "settings": {"address": "127.0.0.1", "port": 80, "network": "tcp"}},
        {"listen": "127.0.0.1", "port": V2RAY_SOCKS_PORT, "protocol": "socks",
         "settings": {"auth": "noauth", "udp": False}}],
        "outbounds": [{"protocol": "vmess", "settings": {"vnext": [{
            "address": CDN_NAME, "port": 443,
            "users": [{"id": user, "alterId": 0, "security": "aes-128-gcm"}]}]},
            "streamSettings": {"network": "ws", "security": "tls",
                               "tlsSettings": {"serverName": CDN_NAME},
                               "wsSettings": {"path": V2RAY_PATH}}}]}
    paths = work / "v2ray-server.json", work / "v2ray-client.json"
    for path, config in zip(paths, (server, client), strict=True):
        path.write_text(json.dumps(config))
    return paths


def compare_paths(lab: BlockLab, mib: int, count: int, v2ray: bool) -> list[dict[str, Any]]:
    lab.use_kernel_bridge()
    rows = [measure(lab, "no tunnel", 0, None, mib, count)]
    lab.restart_client()
    rows.append(measure(lab, "veil direct", FORWARD_PORT, SOCKS_PORT, mib, count))
    # The same server's key with a direct address that refuses: the client takes the CDN way.
    cdn_key = lab.key.replace(f"@{SERVER_IP}:{SERVER_PORT}", f"@{SERVER_IP}:1")
    assert cdn_key != lab.key
    if lab.client is not None:
        lab.stop(lab.client)
    client = lab.start_veil_client(key=cdn_key)
    wait_until(lambda: f"connected to https://{CDN_NAME}/" in client.text(), UP_S,
               "the client on the CDN way")
    assert lab.carrier_of_next(10.0) == CDN_IP
    rows.append(measure(lab, "veil via CDN", FORWARD_PORT, SOCKS_PORT, mib, count))
    if v2ray:
        if shutil.which("v2ray") is None:
            rows.append({"name": "v2ray vmess+ws via CDN", "error": "v2ray is not installed"})
        else:
            rows.append(v2ray_row(lab, mib, count))
    return rows


def v2ray_row(lab: BlockLab, mib: int, count: int) -> dict[str, Any]:
    server_conf, client_conf = v2ray_configs(lab.dir, lab.ca_file)
    procs: list[Proc] = []
    try:
        procs.append(lab.start("server", "v2ray-server", ["v2ray", "-config", str(server_conf)]))
        lab.wait_tcp("server", V2RAY_SERVER_PORT)
        # Go reads SSL_CERT_FILE as Python does: the CDN's test CA, as the web PKI's.
        procs.append(lab.start("client", "v2ray-client", [
            "env", f"SSL_CERT_FILE={lab.ca_file}", "v2ray", "-config", str(client_conf)]))
        lab.wait_tcp("client", V2RAY_FORWARD_PORT)
        version = subprocess.run(["v2ray", "version"], capture_output=True, text=True)
        row = measure(lab, "v2ray vmess+ws via CDN", V2RAY_FORWARD_PORT, V2RAY_SOCKS_PORT,
                      mib, count)
        row["version"] = version.stdout.splitlines()[0] if version.stdout else "?"
        return row
    except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
        return {"name": "v2ray vmess+ws via CDN", "error": str(exc)[-300:]}
    finally:
        for proc in procs:
            lab.stop(proc)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per block kind (median)")
    parser.add_argument("--kinds", default="rst,blackhole", help="block kinds: rst, blackhole")
    parser.add_argument("--keepalive", help="the client's --keepalive (default: veil's)")
    parser.add_argument("--mib", type=int, default=128, help="MiB per throughput download")
    parser.add_argument("--ttfb-count", type=int, default=50, help="TTFB connections")
    parser.add_argument("--no-v2ray", dest="v2ray", action="store_false")
    parser.add_argument("--no-blocks", dest="blocks", action="store_false",
                        help="only compare the paths")
    parser.add_argument("--no-paths", dest="paths", action="store_false",
                        help="only time the blocks")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    for kind in kinds:
        if kind not in BLOCKS:
            parser.error(f"unknown block kind {kind!r}")
    results: dict[str, Any] = {"keepalive": args.keepalive or "default (10:10)",
                               "blocks": {}, "paths": []}
    with BlockLab(keepalive=args.keepalive, cdn_locations=V2RAY_LOCATION) as lab:
        lab.start_veil_server()
        lab.start_veil_client()
        if args.blocks:
            for kind in kinds:
                log(f"block {kind}: {args.runs} runs")
                results["blocks"][kind] = block_runs(lab, kind, args.runs)
        if args.paths:
            log("paths")
            results["paths"] = compare_paths(lab, args.mib, args.ttfb_count, args.v2ray)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"keepalive {results['keepalive']}")
    for kind, figures in results["blocks"].items():
        never = f", {figures['never']} never within {WORKING_WITHIN_S:.0f} s" \
            if figures["never"] else ""
        print(f"block {kind:9}: working again after {figures['median_working_again_s']} s "
              f"(median of {len(figures['working_again_s'])}: {figures['working_again_s']}"
              f"{never}); back on the direct way {figures['median_back_s']} s after the lift")
    rows = {row["name"]: row for row in results["paths"]}
    if not rows:
        return 0
    print(f"{'path':26} {'Mbit/s':>8} {'first byte ms':>14} {'TTFB ms':>8}")
    for row in results["paths"]:
        if "error" in row:
            print(f"{row['name']:26} ERR {row['error']}")
            continue
        print(f"{row['name']:26} {row['mbit_s']:>8} {row['first_byte_ms']:>14} "
              f"{row['ttfb_ms']:>8}")
    direct, cdn = rows.get("veil direct", {}), rows.get("veil via CDN", {})
    peer = rows.get("v2ray vmess+ws via CDN", {})
    print(f"veil via CDN / veil direct: throughput "
          f"{ratio(cdn.get('mbit_s'), direct.get('mbit_s'))}, TTFB "
          f"{ratio(cdn.get('ttfb_ms'), direct.get('ttfb_ms'))}")
    print(f"veil via CDN / v2ray vmess+ws via CDN: throughput "
          f"{ratio(cdn.get('mbit_s'), peer.get('mbit_s'))}, TTFB "
          f"{ratio(cdn.get('ttfb_ms'), peer.get('ttfb_ms'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
