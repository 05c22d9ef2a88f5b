#!/usr/bin/env python3
"""Run veil and its peers side by side in one run and print ratios.

For each peer (see peers.py) in namespaces made for the run (see netns.py):

* forward-mode throughput: iperf3 in the client namespace to 127.0.0.1:PORT,
  the tunnel's forwarder, the tunnel, the iperf3 server in the server
  namespace; one stream and four (``-P 4``); peak RSS (VmHWM) of the tunnel's
  server and forwarder afterwards;
* time to first byte: sequential fresh connections through the tunnel's
  SOCKS5 inbound to an nginx in the server namespace, 1 KiB GETs; once on the
  bare veth and once across a user-space bridge adding a round-trip delay
  (delaybridge.py), checked with a ping first.

Prints a table and writes JSON into bench/results/. Needs root. Usage::

    python3 bench/run.py [--quick] [--only veil,ss-aes] [--duration 10]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import netns
from netns import CLIENT_IP, SERVER_IP, BenchError, Proc, Topology, ns_exec, wait_listen
from peers import BY_NAME, PEERS, Peer

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

IPERF_PORT = 5201
WEB_PORT = 8080
SERVER_PORT_BASE = 20000   # peer i: its server on 20000 + 10*i
LOCAL_PORT_BASE = 30000    # peer i: forwarder on 30000 + 10*i, SOCKS5 on that + 1
SNI = "veilbench.test"
BODY_SIZE = 1024

# How long the veil server gets to print its access key.
KEY_TIMEOUT_S = 20.0
# Pause between two iperf3 runs, so the next one does not start among the
# last one's closing connections.
COOLDOWN_S = 1.0
# Extra time an iperf3 run may take beyond -t (connects, the final exchange).
IPERF_SLACK_S = 30.0
# The delayed-link check: ping's median RTT must be within this of the target.
RTT_TOLERANCE = 0.2


class CpuWatch:
    """How much CPU processes other than the bench's used meanwhile (a noise gauge).

    The machine's user+system time from /proc/stat, minus this process's and its
    reaped children's (every process the bench started is reaped before the end).
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = self._machine_busy()
        self.ours0 = self._ours()

    @staticmethod
    def _machine_busy() -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system = (int(x) for x in fields[1:4])
        return (user + nice + system) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def other_pct(self) -> float:
        """Others' CPU time as a percentage of the machine's capacity over the interval."""
        wall = time.monotonic() - self.t0
        other = (self._machine_busy() - self.busy0) - (self._ours() - self.ours0)
        return max(0.0, 100.0 * other / (wall * (os.cpu_count() or 1)))


# Above this, the report warns that other programs competed for the CPUs. The
# gauge also counts kernel threads (ksoftirqd) working on the bench's own
# packets, a few percent under heavy traffic, hence not lower.
OTHER_CPU_WARN_PCT = 10.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- one peer's processes ------------------------------------------------------

def veil_executable() -> str:
    """The ``veil`` of this interpreter's environment (not a pyenv shim), or PATH's."""
    here = Path(sys.executable).parent / "veil"
    return str(here) if here.exists() else (shutil.which("veil") or "veil")


class PeerRun:
    """One peer's server and clients in one topology; stops them on exit."""

    def __init__(self, topo: Topology, peer: Peer, index: int, workdir: Path,
                 common: dict[str, str]) -> None:
        self.topo = topo
        self.peer = peer
        self.dir = workdir / peer.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vars = dict(common)
        self.vars.update(
            dir=str(self.dir),
            server_port=str(SERVER_PORT_BASE + 10 * index),
            local_port=str(LOCAL_PORT_BASE + 10 * index),
            socks_port=str(LOCAL_PORT_BASE + 10 * index + 1),
            target_host=SERVER_IP,
            target_port=str(IPERF_PORT),
        )
        self.server: Proc | None = None
        self.clients: list[Proc] = []

    def render(self, argv: Sequence[str]) -> list[str]:
        return [string.Template(a).substitute(self.vars) for a in argv]

    def _check_runnable(self, argv: Sequence[str]) -> None:
        exe = argv[0]
        if not (shutil.which(exe) or (os.path.isabs(exe) and os.access(exe, os.X_OK))):
            raise BenchError(f"not installed: {exe} (see bench/setup.sh)")

    def __enter__(self) -> PeerRun:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in [*self.clients, *([self.server] if self.server else [])]:
            with contextlib.suppress(Exception):
                proc.stop()

    def start_server(self) -> None:
        peer = self.peer
        if peer.direct:
            return
        for mod in peer.python_modules:
            r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True,
                               text=True)
            if r.returncode:
                raise BenchError(f"python module {mod} not importable (see bench/setup.sh)")
        for name, template in peer.files.items():
            (self.dir / name).write_text(string.Template(template).substitute(self.vars))
        argv = self.render(peer.server)
        self._check_runnable(argv)
        self.server = self.topo.start(f"{peer.name}-server", self.topo.server, argv,
                                      capture_stdout=peer.key_from_stdout)
        wait_listen(self.server, int(self.vars["server_port"]))
        if peer.key_from_stdout:
            self.vars["key"] = self._access_key()

    def _access_key(self) -> str:
        """The key the server printed; failing that, one from ``veil user add``."""
        assert self.server is not None
        line = self.server.wait_stdout(lambda s: s.strip().startswith("veil://"), KEY_TIMEOUT_S)
        if line:
            return line.strip()
        argv = [self.vars["veil"], "user", "add", "bench", "--state", f"{self.dir}/state"]
        r = subprocess.run(ns_exec(self.topo.server, argv), capture_output=True, text=True,
                           timeout=KEY_TIMEOUT_S)
        keys = [s.strip() for s in r.stdout.splitlines() if s.strip().startswith("veil://")]
        if not keys:
            raise self.server.fail("printed no veil:// key on stdout, and `veil user add` "
                                   f"gave none ({r.stderr.strip()[-300:]})")
        return keys[0]

    def start_client(self, role: str) -> Proc:
        """Start the ``forward`` or ``socks`` client and wait until it listens."""
        argv = self.render(getattr(self.peer, role))
        self._check_runnable(argv)
        proc = self.topo.start(f"{self.peer.name}-{role}", self.topo.client, argv)
        self.clients.append(proc)
        port = self.vars["local_port" if role == "forward" else "socks_port"]
        wait_listen(proc, int(port))
        return proc

    def stop_client(self, proc: Proc) -> None:
        proc.stop()
        self.clients.remove(proc)


# -- measurements ----------------------------------------------------------------

def iperf(topo: Topology, host: str, port: int, streams: int, duration: float) -> float:
    """Gbit/s received by the iperf3 server over one run."""
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-P", str(streams),
            "--json", "--connect-timeout", "5000"]
    try:
        r = subprocess.run(ns_exec(topo.client, argv), capture_output=True, text=True,
                           timeout=duration + IPERF_SLACK_S)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"iperf3 -P {streams} hung (> {duration + IPERF_SLACK_S:.0f} s)") from exc
    try:
        result = json.loads(r.stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 -P {streams}: no JSON ({r.stderr.strip()[-200:]})") from exc
    if "error" in result:
        raise BenchError(f"iperf3 -P {streams}: {result['error']}")
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def ttfb(topo: Topology, socks_port: int | None, count: int, timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH_DIR / "probe.py"), "ttfb",
            "--target", f"{SERVER_IP}:{WEB_PORT}", "--count", str(count)]
    if socks_port is not None:
        argv += ["--socks", f"127.0.0.1:{socks_port}"]
    try:
        r = subprocess.run(ns_exec(topo.client, argv), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"TTFB probe took more than {timeout:.0f} s") from exc
    if r.returncode:
        raise BenchError(f"TTFB probe failed: {r.stderr.strip()[-300:]}")
    raw = json.loads(r.stdout)
    body = raw["body_ms"]
    if not body:
        raise BenchError(f"no connection succeeded: {raw['error_samples']}")
    out = {
        "median_ms": statistics.median(body),
        "p90_ms": percentile(body, 90),
        "first_byte_median_ms": statistics.median(raw["first_ms"]),
        "n": len(body),
        "errors": raw["errors"],
        "error_samples": raw["error_samples"],
    }
    if raw["errors"] and len(body) < count:
        out["note"] = f"{count - len(body)} of {count} connections failed"
    return out


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, -(-len(s) * pct // 100) - 1))
    return s[int(k)]


def ping(topo: Topology, count: int = 10) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH_DIR / "probe.py"), "ping", SERVER_IP, "--count",
            str(count + 1)]
    raw = json.loads(netns.run(ns_exec(topo.client, argv), timeout=60))
    rtts = raw["rtt_ms"][1:]  # the first one waits for ARP across the link
    if not rtts:
        raise BenchError(f"ping {CLIENT_IP} -> {SERVER_IP}: no reply")
    return {"median_ms": statistics.median(rtts), "min_ms": min(rtts), "max_ms": max(rtts),
            "lost": raw["lost"]}


# -- the run -------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, peers: list[Peer]) -> None:
        self.args = args
        self.peers = peers
        self.tag = str(os.getpid())
        self.work = Path(tempfile.mkdtemp(prefix=f"{netns.NS_PREFIX}-{self.tag}-"))
        self.results: dict[str, dict[str, Any]] = {
            p.name: {"title": p.title, "errors": {}} for p in peers}
        self.meta: dict[str, Any] = {}
        self.common = {
            "server_ip": SERVER_IP,
            "web_port": str(WEB_PORT),
            "password": secrets.token_hex(16),
            "uuid": str(uuid.uuid4()),
            "cert": str(self.work / "cert.pem"),
            "cert_key": str(self.work / "key.pem"),
            "sni": SNI,
            "python": sys.executable,
            "bench": str(BENCH_DIR),
            "veil": veil_executable(),
            "key": "",
        }

    # setup shared by every peer
    def prepare(self) -> None:
        netns.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                   "ec_paramgen_curve:prime256v1", "-nodes", "-days", "7",
                   "-subj", f"/CN={SNI}", "-addext", f"subjectAltName=DNS:{SNI}",
                   "-keyout", self.common["cert_key"], "-out", self.common["cert"]])
        www = self.work / "nginx" / "www"
        www.mkdir(parents=True)
        (www / "1k").write_bytes(b"v" * BODY_SIZE)
        conf = string.Template(NGINX_CONF).substitute(
            prefix=self.work / "nginx", ip=SERVER_IP, port=WEB_PORT)
        (self.work / "nginx" / "nginx.conf").write_text(conf)
        self.meta["versions"] = self.versions()

    def versions(self) -> dict[str, str]:
        out = {}
        probes: list[tuple[str, Sequence[str]]] = [
            ("iperf3", ["iperf3", "--version"]), ("nginx", ["nginx", "-v"]),
            ("python", [sys.executable, "--version"]), ("kernel", ["uname", "-r"])]
        probes += [(p.name, p.version) for p in self.peers if p.version]
        for name, argv in probes:
            argv = [string.Template(a).substitute(self.common) for a in argv]
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                text = (r.stdout.strip() or r.stderr.strip()).splitlines()
                out[name] = text[0] if text and r.returncode == 0 else "?"
            except (OSError, subprocess.TimeoutExpired):
                out[name] = "?"
        return out

    def start_web(self, topo: Topology) -> None:
        prefix = self.work / "nginx"
        web = topo.start("nginx", topo.server, ["nginx", "-p", str(prefix), "-c",
                                                 str(prefix / "nginx.conf"),
                                                 "-e", str(prefix / "error.log")])
        wait_listen(web, WEB_PORT)

    def stage(self, peer: Peer, key: str, fn: Callable[[], None]) -> bool:
        """Run one measurement of one peer; a failure becomes that row's error."""
        try:
            fn()
            return True
        except BenchError as exc:
            self.results[peer.name]["errors"][key] = str(exc)
            log(f"  {peer.name}: {key} FAILED: {exc}")
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            self.results[peer.name]["errors"][key] = f"{type(exc).__name__}: {exc}"
            log(f"  {peer.name}: {key} FAILED: {type(exc).__name__}: {exc}")
        return False

    def phase_bare(self) -> None:
        a = self.args
        with Topology(self.tag, self.work / "logs-bare") as topo:
            self.meta["bare_ping"] = ping(topo)
            log(f"[bare] ping RTT median {self.meta['bare_ping']['median_ms']:.3f} ms")
            self.start_web(topo)
            for i, peer in enumerate(self.peers):
                res = self.results[peer.name]
                log(f"[bare] {peer.name}")
                with PeerRun(topo, peer, i, self.work / "bare", self.common) as pr:
                    if not self.stage(peer, "server", pr.start_server):
                        continue
                    if "thr" in a.tests:
                        self.stage(peer, "throughput",
                                   functools.partial(self.throughput, topo, pr, res))
                    if "ttfb" in a.tests:
                        self.stage(peer, "ttfb_bare",
                                   functools.partial(self.ttfb_stage, topo, pr, res,
                                                     "ttfb_bare", a.ttfb_count))

    def phase_delayed(self) -> None:
        a = self.args
        with Topology(self.tag, self.work / "logs-delayed", delay_ms=a.rtt) as topo:
            check = ping(topo)
            self.meta["delayed_ping"] = check
            log(f"[delayed] ping RTT median {check['median_ms']:.1f} ms (target {a.rtt:g} ms)")
            if abs(check["median_ms"] - a.rtt) > RTT_TOLERANCE * a.rtt:
                raise BenchError(f"delay bridge RTT {check['median_ms']:.1f} ms, "
                                 f"wanted {a.rtt:g} ms")
            self.start_web(topo)
            for i, peer in enumerate(self.peers):
                res = self.results[peer.name]
                log(f"[delayed] {peer.name}")
                with PeerRun(topo, peer, i, self.work / "delayed", self.common) as pr:
                    if not self.stage(peer, "server_delayed", pr.start_server):
                        continue
                    self.stage(peer, "ttfb_delayed",
                               functools.partial(self.ttfb_stage, topo, pr, res,
                                                 "ttfb_delayed", a.delayed_count))

    def throughput(self, topo: Topology, pr: PeerRun, res: dict[str, Any]) -> None:
        a = self.args
        iperf_srv = topo.start(f"iperf3-{pr.peer.name}", topo.server,
                               ["iperf3", "-s", "-B", SERVER_IP, "-p", str(IPERF_PORT)])
        fwd = None
        try:
            wait_listen(iperf_srv, IPERF_PORT)
            if pr.peer.direct:
                host, port = SERVER_IP, IPERF_PORT
            else:
                fwd = pr.start_client("forward")
                host, port = "127.0.0.1", int(pr.vars["local_port"])
            for streams in (1, 4):
                runs = []
                for _ in range(a.repeat):
                    runs.append(iperf(topo, host, port, streams, a.duration))
                    time.sleep(COOLDOWN_S)
                res[f"thr{streams}_gbps"] = statistics.median(runs)
                res[f"thr{streams}_runs"] = runs
                log(f"  {pr.peer.name}: {streams} stream(s) {res[f'thr{streams}_gbps']:.2f} Gbit/s")
            if pr.server:
                res["rss_server_kib"] = pr.server.peak_rss_kib()
            if fwd:
                res["rss_client_kib"] = fwd.peak_rss_kib()
        finally:
            if fwd:
                pr.stop_client(fwd)
            iperf_srv.stop()

    def ttfb_stage(self, topo: Topology, pr: PeerRun, res: dict[str, Any], key: str,
                   count: int) -> None:
        socks = None
        port = None
        if not pr.peer.direct:
            socks = pr.start_client("socks")
            port = int(pr.vars["socks_port"])
        try:
            per_conn = 2.0 + 10 * self.args.rtt / 1000.0 if key == "ttfb_delayed" else 2.0
            res[key] = ttfb(topo, port, count, timeout=60 + count * per_conn)
            if socks:
                res[f"rss_socks_client_{key}_kib"] = socks.peak_rss_kib()
            log(f"  {pr.peer.name}: {key} median {res[key]['median_ms']:.2f} ms "
                f"p90 {res[key]['p90_ms']:.2f} ms")
        finally:
            if socks:
                pr.stop_client(socks)

    def run(self) -> None:
        try:
            self.prepare()
            if {"thr", "ttfb"} & set(self.args.tests):
                self.phase("bare", self.phase_bare)
            if "delay" in self.args.tests:
                self.phase("delayed", self.phase_delayed)
        finally:
            Proc.stop_all()

    def phase(self, name: str, fn: Callable[[], None]) -> None:
        """Run one phase; if its shared setup fails, say so and go on to the next."""
        try:
            fn()
        except (BenchError, OSError, subprocess.SubprocessError, ValueError) as exc:
            self.meta[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            log(f"[{name}] FAILED: {exc}")

    def close(self) -> None:
        if self.args.keep:
            log(f"configs and logs kept in {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid $prefix/nginx.pid;
error_log $prefix/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_timeout 0;
    default_type application/octet-stream;
    client_body_temp_path $prefix/tmp-body;
    proxy_temp_path $prefix/tmp-proxy;
    fastcgi_temp_path $prefix/tmp-fastcgi;
    uwsgi_temp_path $prefix/tmp-uwsgi;
    scgi_temp_path $prefix/tmp-scgi;
    server {
        listen $ip:$port;
        root $prefix/www;
    }
}
"""


# -- report --------------------------------------------------------------------

def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def report(results: dict[str, dict[str, Any]], rtt: float) -> str:
    tunnels = [r for n, r in results.items() if n != "direct"]
    best1 = max((r.get("thr1_gbps") or 0 for r in tunnels), default=0)
    best4 = max((r.get("thr4_gbps") or 0 for r in tunnels), default=0)
    rows = []
    for name, r in results.items():
        tb, td = r.get("ttfb_bare") or {}, r.get("ttfb_delayed") or {}
        rows.append([
            name,
            fmt(r.get("thr1_gbps")), fmt(r.get("thr4_gbps")),
            f"{ratio(r.get('thr1_gbps'), best1)} / {ratio(r.get('thr4_gbps'), best4)}",
            f"{fmt(mib(r.get('rss_server_kib')), '.1f')} / "
            f"{fmt(mib(r.get('rss_client_kib')), '.1f')}",
            f"{fmt(tb.get('median_ms'))} / {fmt(tb.get('p90_ms'))}",
            f"{fmt(td.get('median_ms'), '.1f')} / {fmt(td.get('p90_ms'), '.1f')}",
            "ERR" if r["errors"] else "",
        ])
    out = [table(rows, ["peer", "1 str Gb/s", "4 str Gb/s", "vs best 1/4",
                        "RSS srv/cli MiB", "TTFB bare med/p90 ms",
                        f"TTFB +{rtt:g}ms med/p90 ms", ""])]
    out.append("'vs best': throughput / the fastest peer's (direct excluded). "
               "TTFB: connect to Content-Length of a 1 KiB GET via SOCKS5.")

    veil = results.get("veil")
    if veil is not None:
        vrows = []
        for name, r in results.items():
            if name == "veil":
                continue
            vrows.append([
                name,
                ratio(veil.get("thr1_gbps"), r.get("thr1_gbps")),
                ratio(veil.get("thr4_gbps"), r.get("thr4_gbps")),
                ratio(veil.get("rss_server_kib"), r.get("rss_server_kib")),
                ratio(veil.get("rss_client_kib"), r.get("rss_client_kib")),
                ratio((veil.get("ttfb_bare") or {}).get("median_ms"),
                      (r.get("ttfb_bare") or {}).get("median_ms")),
                ratio((veil.get("ttfb_delayed") or {}).get("median_ms"),
                      (r.get("ttfb_delayed") or {}).get("median_ms")),
            ])
        out += ["", "veil / peer (throughput: >1 = veil faster; RSS, TTFB: <1 = veil better)",
                table(vrows, ["peer", "thr 1", "thr 4", "RSS srv", "RSS cli", "TTFB bare",
                              f"TTFB +{rtt:g}ms"])]

    errs = [(n, k, v) for n, r in results.items() for k, v in r["errors"].items()]
    if errs:
        out += ["", "errors:"] + [f"  {n} [{k}]: {v}" for n, k, v in errs]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="3 s per iperf3 run and 50 TTFB connections (unless given)")
    p.add_argument("--only", help="comma-separated peers (direct is always run); "
                   f"known: {','.join(BY_NAME)}")
    p.add_argument("--duration", type=float, help="seconds per iperf3 run (default 10)")
    p.add_argument("--ttfb-count", type=int, help="TTFB connections on the bare link (200)")
    p.add_argument("--delayed-count", type=int, help="TTFB connections on the delayed link (200)")
    p.add_argument("--rtt", type=float, default=100.0, help="delayed link round trip, ms")
    p.add_argument("--repeat", type=int, default=1, help="iperf3 runs per case; median kept")
    p.add_argument("--tests", default="thr,ttfb,delay",
                   help="any of thr (throughput), ttfb (bare), delay (TTFB across the delay)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir of configs and logs")
    p.add_argument("--json", type=Path, help="write the JSON here instead of bench/results/")
    p.add_argument("--cleanup", action="store_true",
                   help="only delete namespaces left by earlier runs (any veilbench-*) and exit")
    a = p.parse_args(argv)
    a.duration = a.duration or (3.0 if a.quick else 10.0)
    a.ttfb_count = a.ttfb_count or (50 if a.quick else 200)
    a.delayed_count = a.delayed_count or (50 if a.quick else 200)
    a.tests = [t.strip() for t in a.tests.split(",") if t.strip()]
    unknown = set(a.tests) - {"thr", "ttfb", "delay"}
    if unknown:
        p.error(f"unknown tests: {','.join(sorted(unknown))}")
    return a


def select_peers(only: str | None) -> list[Peer]:
    if not only:
        return list(PEERS)
    names = {n.strip() for n in only.split(",") if n.strip()} | {"direct"}
    unknown = names - set(BY_NAME)
    if unknown:
        raise SystemExit(f"unknown peers: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(BY_NAME)}")
    return [p for p in PEERS if p.name in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run.py needs root (network namespaces)")
    if args.cleanup:
        removed = netns.cleanup_stale(force=True)
        print("removed: " + (", ".join(removed) or "nothing"))
        return 0
    missing = [t for t in ("ip", "iperf3", "nginx", "openssl") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}; run bench/setup.sh")
    for ns in netns.cleanup_stale():
        log(f"removed stale namespace {ns}")

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT explicitly too: a shell starting run.py in the background leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    bench = Bench(args, select_peers(args.only))
    started = dt.datetime.now()
    watch = CpuWatch()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaned up; reporting what was measured")
    finally:
        Proc.stop_all()
        bench.close()

    doc = {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "kernel": platform.release(), "loadavg_before": load_before,
                 "other_processes_cpu_pct": round(watch.other_pct(), 1)},
        "settings": {"duration_s": args.duration, "ttfb_count": args.ttfb_count,
                     "delayed_count": args.delayed_count, "rtt_ms": args.rtt,
                     "repeat": args.repeat, "tests": args.tests, "mtu": netns.MTU},
        **bench.meta,
        "peers": bench.results,
    }
    path = args.json or RESULTS_DIR / f"veilbench-{started:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(report(bench.results, args.rtt))
    other = doc["host"]["other_processes_cpu_pct"]
    if other > OTHER_CPU_WARN_PCT:
        print(f"\nwarning: other processes used ~{other:.0f}% of the CPUs during this run "
              "(load average before it: " + " ".join(load_before) + "); figures are noisy")
    for name in ("bare", "delayed"):
        if f"{name}_error" in bench.meta:
            print(f"\n{name} phase failed: {bench.meta[f'{name}_error']}")
    print(f"\nJSON: {path}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
