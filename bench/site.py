#!/usr/bin/env python3
"""Site-to-site throughput: LAN host to LAN host through veil (``--tun --site``) and through
wireguard-go (a hub with one peer per office), on a clean link and a lossy one.

Topology, in fresh namespaces for each tunnel and link profile (netns.py's helpers)::

    [hostA] 10.0.31.2 -- [gwA] 10.198.1.2 ==== 10.198.1.1 [hub]
    [hostB] 10.0.32.2 -- [gwB] 10.198.2.2 ==== 10.198.2.1 [hub]

The hub is the veil server (or WireGuard's hub); the ``====`` links carry the profile:
``lossy`` puts delaybridge.py (this kernel has no netem) in the middle of both links, 37.5 ms
each way on each (150 ms RTT host to host) and 0.5% loss each (~1% each way host to host).
One iperf3 stream hostA -> hostB, then ``-R``. Prints Mbit/s and veil's ratio; JSON into
bench/results/. Needs root. Usage::

    python3 bench/site.py [--duration 10] [--profiles clean,lossy] [--only veil,wireguard-go]

OpenVPN runs as a server (``--mode server``, a ``client-config-dir`` iroute per office)
with each gateway its client, over UDP (``openvpn-tcp`` is there too but not run by default:
here its server resets a gateway's connection during the first transfer, not yet understood).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import netns
from netns import BenchError, Proc, delete_ns, ns_exec, run

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
IPERF_PORT = 5201
VEIL_PORT = 8443
WG_PORT = 51820
OVPN_PORT = 1194
HOST_A, HOST_B = "10.0.31.2", "10.0.32.2"
SITE_A, SITE_B = "10.0.31.0/24", "10.0.32.0/24"
# How long a tunnel gets to come up (Python start-up on a busy 2-core box, TLS handshakes).
UP_TIMEOUT_S = 30.0
# The lossy profile, per link (two links, so host to host: 4 x 37.5 ms RTT, ~1% each way).
LOSSY_DELAY_MS = 37.5
LOSSY_LOSS_PCT = 0.5
PROFILES = ("clean", "lossy")


class SiteTopology:
    """hostA - gwA - hub - gwB - hostB; always cleaned up (context manager)."""

    def __init__(self, tag: str, log_dir: Path, profile: str) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        roles = ["hostA", "gwA", "hub", "gwB", "hostB"]
        if profile == "lossy":
            roles += ["midA", "midB"]  # the delay bridges of the two links
        self.ns = {role: f"{netns.NS_PREFIX}-{tag}-{role}" for role in roles}
        self.profile = profile
        self.created: list[str] = []
        self.procs: list[Proc] = []

    def __enter__(self) -> SiteTopology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        run(["ip", "-n", self.ns[a], "link", "add", a_if, "type", "veth", "peer", "name", b_if,
             "netns", self.ns[b]])
        run(["ip", "-n", self.ns[a], "link", "set", a_if, "up"])
        run(["ip", "-n", self.ns[b], "link", "set", b_if, "up"])

    def ip(self, role: str, *args: str) -> None:
        run(["ip", "-n", self.ns[role], *args])

    def _build(self) -> None:
        for role, name in self.ns.items():
            run(["ip", "netns", "add", name])
            self.created.append(name)
            self.ip(role, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / name  # ip netns exec bind-mounts it: never the host's
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        for host, gw, lan in (("hostA", "gwA", "10.0.31"), ("hostB", "gwB", "10.0.32")):
            self._veth(host, "h0", gw, "lan")
            self.ip(host, "addr", "add", f"{lan}.2/24", "dev", "h0")
            self.ip(gw, "addr", "add", f"{lan}.1/24", "dev", "lan")
            self.ip(host, "route", "add", "default", "via", f"{lan}.1")
        for gw, n, mid in (("gwA", 1, "midA"), ("gwB", 2, "midB")):
            if self.profile == "lossy":
                # The middle's kernel must not speak on the link (no IPv6 DAD/RS).
                run(ns_exec(self.ns[mid], ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                           "net.ipv6.conf.default.disable_ipv6=1"]))
                self._veth(gw, "up0", mid, "leg0")
                self._veth("hub", f"g{n}", mid, "leg1")
                for role, dev in ((gw, "up0"), ("hub", f"g{n}")):
                    # One loss draw per packet, not per 64 KiB TSO frame (bursts otherwise).
                    self.ip(role, "link", "set", dev, "gso_max_segs", "1")
                bridge = self.start(f"delaybridge-{mid}", mid, [
                    sys.executable, str(BENCH_DIR / "delaybridge.py"), "--a", "leg0", "--b", "leg1",
                    "--delay", str(LOSSY_DELAY_MS), "--loss", str(LOSSY_LOSS_PCT)],
                    capture_stdout=True)
                if bridge.wait_stdout(lambda s: s == "ready", UP_TIMEOUT_S) is None:
                    raise bridge.fail("delay bridge did not start")
            else:
                self._veth(gw, "up0", "hub", f"g{n}")
            self.ip(gw, "addr", "add", f"10.198.{n}.2/24", "dev", "up0")
            self.ip("hub", "addr", "add", f"10.198.{n}.1/24", "dev", f"g{n}")
            self.ip(gw, "route", "add", "default", "via", f"10.198.{n}.1")

    def start(self, name: str, role: str, argv: list[str], capture_stdout: bool = False) -> Proc:
        proc = Proc(name, self.ns[role], argv, self.log_dir, capture_stdout=capture_stdout)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # cleanup goes on
                print(f"stopping {proc.name}: {exc}", file=sys.stderr)
        self.procs.clear()
        for name in reversed(self.created):
            delete_ns(name)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        self.created.clear()


def wait_log(proc: Proc, text: str, timeout: float = UP_TIMEOUT_S) -> None:
    netns.wait_log(proc, text, timeout)


def veil_cli(topo: SiteTopology, state: Path, *args: str) -> str:
    return run(ns_exec(topo.ns["hub"], [sys.executable, "-m", "veil", "user", *args,
                                        "--state", str(state)]), timeout=60).strip()


def setup_veil(topo: SiteTopology, work: Path) -> None:
    state = work / "veil-state"
    server = topo.start("veil-server", "hub", [
        sys.executable, "-m", "veil", "-v", "serve", "--self-signed", "--state", str(state),
        "--listen", f"0.0.0.0:{VEIL_PORT}", "--public", f"10.198.1.1:{VEIL_PORT}", "--tun"])
    wait_log(server, "listening on")
    for gw, site in (("gwA", SITE_A), ("gwB", SITE_B)):
        key = veil_cli(topo, state, "add", f"site-{gw}", "--site", site)
        if gw == "gwB":  # gwB dials the hub on its own link
            key = key.replace("10.198.1.1", "10.198.2.1")
        proc = topo.start(f"veil-{gw}", gw, [sys.executable, "-m", "veil", "-v", "connect",
                                             key, "--tun", "--site"])
        wait_log(proc, "site gateway, routes")
    for gw, other in (("gwA", SITE_B), ("gwB", SITE_A)):
        wait_log(next(p for p in topo.procs if p.name == f"veil-{gw}"), other)


def setup_wireguard(topo: SiteTopology, work: Path) -> None:
    wg, wireguard_go = shutil.which("wg"), shutil.which("wireguard-go")
    if wg is None or wireguard_go is None:
        raise BenchError("wireguard-go or wg is not installed (bench/setup.sh)")
    tag = os.getpid() % 10000  # interface names are global (/var/run/wireguard sockets)
    names = {"hub": f"wsh{tag}", "gwA": f"wsa{tag}", "gwB": f"wsb{tag}"}
    keys = netns.start_wireguard_devices(topo.start, names, work, UP_TIMEOUT_S)
    hub = names["hub"]
    run(ns_exec(topo.ns["hub"], [
        wg, "set", hub, "listen-port", str(WG_PORT), "private-key", str(keys["hub"][0]),
        "peer", keys["gwA"][1], "allowed-ips", f"10.88.0.2/32,{SITE_A}",
        "peer", keys["gwB"][1], "allowed-ips", f"10.88.0.3/32,{SITE_B}"]))
    for role, n, own, other in (("gwA", 1, "10.88.0.2", SITE_B), ("gwB", 2, "10.88.0.3", SITE_A)):
        run(ns_exec(topo.ns[role], [
            wg, "set", names[role], "private-key", str(keys[role][0]), "peer", keys["hub"][1],
            "allowed-ips", f"10.88.0.0/24,{other}", "endpoint", f"10.198.{n}.1:{WG_PORT}",
            "persistent-keepalive", "5"]))
        topo.ip(role, "addr", "add", f"{own}/24", "dev", names[role])
        topo.ip(role, "link", "set", names[role], "up")
        topo.ip(role, "route", "add", other, "dev", names[role])
        run(ns_exec(topo.ns[role], ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
    topo.ip("hub", "addr", "add", "10.88.0.1/24", "dev", hub)
    topo.ip("hub", "link", "set", hub, "up")
    for site in (SITE_A, SITE_B):
        topo.ip("hub", "route", "add", site, "dev", hub)
    run(ns_exec(topo.ns["hub"], ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))


def write_pki(directory: Path, clients: tuple[str, ...]) -> dict[str, Path]:
    """A CA, the server's certificate and one per client (its common name: OpenVPN's
    client-config-dir file name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def cert(cn: str, key: ec.EllipticCurvePrivateKey, ca: bool,
             usage: x509.ObjectIdentifier | None) -> bytes:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(cert("bench CA", ca_key, True, None))
    for name in ("server", *clients):
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if name == "server" else (
            ExtendedKeyUsageOID.CLIENT_AUTH)
        out[name] = directory / f"{name}.pem"
        out[name].write_bytes(cert(name, key, False, usage))
        out[f"{name}_key"] = directory / f"{name}.key"
        out[f"{name}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out[f"{name}_key"].chmod(0o600)
    return out


def setup_openvpn(proto: str) -> Callable[[SiteTopology, Path], None]:
    def setup(topo: SiteTopology, work: Path) -> None:
        openvpn = shutil.which("openvpn")
        if openvpn is None:
            raise BenchError("openvpn is not installed (bench/setup.sh)")
        pki = write_pki(work, ("gwA", "gwB"))
        ccd = work / "ccd"
        ccd.mkdir()
        (ccd / "gwA").write_text("iroute 10.0.31.0 255.255.255.0\n")
        (ccd / "gwB").write_text("iroute 10.0.32.0 255.255.255.0\n")
        udp = proto == "udp"
        common = ["--dev", "tun", "--verb", "3", "--ca", str(pki["ca"]), "--ping", "10",
                  "--topology", "subnet"]
        run(ns_exec(topo.ns["hub"], ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
        topo.start(f"openvpn-{proto}-server", "hub", [
            openvpn, *common, "--mode", "server", "--tls-server", "--dh", "none",
            "--cert", str(pki["server"]), "--key", str(pki["server_key"]),
            "--ifconfig", "10.89.0.1", "255.255.255.0",
            "--ifconfig-pool", "10.89.0.2", "10.89.0.20", "--push", "topology subnet",
            "--push", "route-gateway 10.89.0.1",
            "--client-config-dir", str(ccd), "--client-to-client",
            "--route", "10.0.31.0", "255.255.255.0", "--route", "10.0.32.0", "255.255.255.0",
            "--lport", str(OVPN_PORT), "--proto", "udp4" if udp else "tcp4-server"])
        time.sleep(0.5)
        for role, n, other in (("gwA", 1, "10.0.32.0"), ("gwB", 2, "10.0.31.0")):
            run(ns_exec(topo.ns[role], ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
            client = topo.start(f"openvpn-{proto}-{role}", role, [
                openvpn, *common, "--client", "--tls-client", "--cert", str(pki[role]),
                "--key", str(pki[f"{role}_key"]), "--nobind", "--connect-retry", "1",
                "--remote", f"10.198.{n}.1", str(OVPN_PORT),
                "--proto", "udp4" if udp else "tcp4-client",
                "--route", other, "255.255.255.0"])
            wait_log(client, "Initialization Sequence Completed")
    return setup


TUNNELS: dict[str, Callable[[SiteTopology, Path], None]] = {
    "veil": setup_veil,
    "wireguard-go": setup_wireguard,
    "openvpn-udp": setup_openvpn("udp"),
    "openvpn-tcp": setup_openvpn("tcp"),
}


def iperf(topo: SiteTopology, duration: float, reverse: bool) -> float:
    argv = ["iperf3", "-c", HOST_B, "-p", str(IPERF_PORT), "-t", str(duration), "-J"]
    if reverse:
        argv.append("-R")
    out = run(ns_exec(topo.ns["hostA"], argv), check=False, timeout=duration + 60)
    try:
        report = json.loads(out)
    except ValueError:
        raise BenchError(f"iperf3 printed no JSON: {out[:200]}") from None
    if "error" in report:  # e.g. the control connection lost
        raise BenchError(f"iperf3: {report['error']}")
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def measure(name: str, profile: str, duration: float, log_dir: Path) -> dict[str, object]:
    tag = f"{os.getpid()}-{name[:4]}{profile[0]}"
    work = Path(tempfile.mkdtemp(prefix=f"{netns.NS_PREFIX}-{os.getpid()}-"))
    try:
        with SiteTopology(tag, log_dir / f"{name}-{profile}", profile) as topo:
            server = topo.start("iperf3", "hostB", ["iperf3", "-s", "-p", str(IPERF_PORT)])
            netns.wait_listen(server, IPERF_PORT)
            TUNNELS[name](topo, work)
            # The path works before it is measured (a first handshake, ARP).
            run(ns_exec(topo.ns["hostA"], ["ping", "-c", "3", "-W", "5", HOST_B]), timeout=30)
            return {"up": iperf(topo, duration, False), "down": iperf(topo, duration, True)}
    except (BenchError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per iperf3 run")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(TUNNELS)}")
    parser.add_argument("--json", type=Path, help="where to write the results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/site.py needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    names = [n for n in TUNNELS if n != "openvpn-tcp"] if not args.only else args.only.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix=f"{netns.NS_PREFIX}-{os.getpid()}-logs-"))
    results: dict[str, dict[str, dict[str, object]]] = {}
    try:
        for profile in args.profiles.split(","):
            for name in names:
                print(f"{name} on a {profile} link ...", file=sys.stderr, flush=True)
                results.setdefault(profile, {})[name] = measure(name, profile, args.duration,
                                                                log_dir)
    finally:
        Proc.stop_all()
    print(f"\none iperf3 stream LAN host A -> LAN host B (up) and back (down), "
          f"{args.duration:g} s each, Mbit/s\n")
    print(f"{'link':<7} {'tunnel':<14} {'up':>8} {'down':>8}   veil/this (up, down)")
    for profile, by_name in results.items():
        veil = by_name.get("veil", {})
        for name, res in by_name.items():
            if "error" in res:
                print(f"{profile:<7} {name:<14} {'ERR':>8} {'ERR':>8}   {res['error']}")
                continue
            ratio = ""
            if name != "veil" and "up" in veil and float(res["up"]) and float(res["down"]):  # type: ignore[arg-type]
                ratio = (f"{float(veil['up']) / float(res['up']):.1f}x, "  # type: ignore[arg-type]
                         f"{float(veil['down']) / float(res['down']):.1f}x")  # type: ignore[arg-type]
            print(f"{profile:<7} {name:<14} {res['up']:>8.0f} {res['down']:>8.0f}   {ratio}")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = args.json or RESULTS_DIR / f"site-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"duration": args.duration, "results": results}, indent=1))
    print(f"\nlogs: {log_dir}\nJSON: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
