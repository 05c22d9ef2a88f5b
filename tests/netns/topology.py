"""A small Internet in network namespaces, for the TUN-mode tests.

::

    [client1] c0 ---- r1 [router] rs ---- s0 [server] si ---- i0 [internet]
    [client2] c0 ---- r2 /                 veil serve --tun       nginx, dnsmasq,
                                                                  iperf3, UDP echo

Clients are on 10.0.1N.0/24 + fd00:1N::/64 (N = 1, 2), the router-server link is
10.0.2.0/24 + fd00:2::/64, the "Internet" is 203.0.113.0/24 + 2001:db8:3::/64 (public-looking
addresses: the server's default policy keeps clients away from private ranges). Without the
tunnel a client reaches the Internet through the router and the server (both forward): a leak
would work, and the router would see it.

Every namespace is named ``veil-t-<random>-<role>`` and made here; :meth:`Topology.close`
kills the processes started here (by PID), deletes the namespaces (and with them the veths)
and the /etc/netns/<name> directories. Nothing in the root namespace is touched: veths are
created inside the namespaces (``ip -n NS link add ... peer ... netns OTHER``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dpkt

from tests.support.wait import wait_until

VEIL = [sys.executable, "-m", "veil"]
SERVER_IP = "10.0.2.2"
SERVER_PORT = 443
INTERNET_IP = "203.0.113.2"
INTERNET_IP6 = "2001:db8:3::2"
WEB_NAME = "web.test"
UDP_ECHO_PORT = 7777
IPERF_PORT = 5201
# The resolver clients have before the tunnel: on the router, where a DNS leak would go.
LAN_RESOLVER = "10.0.11.1"
GUEST_IP = "10.0.31.2"
GUEST_IP6 = "fd00:31::2"
GUEST_GATEWAY = "10.0.31.1"
STOP_GRACE_S = 5.0


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          input=input, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None


class Topology:
    def __init__(self, clients: int = 1, *, guest: bool = False) -> None:
        tag = secrets.token_hex(3)
        roles = ["router", "server", "internet", *(f"client{i}" for i in range(1, clients + 1))]
        if guest:  # a container or VM behind client1, which forwards for it
            roles.append("guest1")
        self.ns = {role: f"veil-t-{tag}-{role}" for role in roles}
        self.clients = clients
        self.guest = guest
        self.dir = Path(tempfile.mkdtemp(prefix="veil-netns-"))
        self.created: list[str] = []
        self.procs: list[Proc] = []
        self._started = 0

    # ------------------------------------------------------------------ build
    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ip(self, role: str, *args: str, check: bool = True) -> str:
        return run(["ip", "-n", self.ns[role], *args], check=check).stdout

    def exec(self, role: str, *argv: str, check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns[role], *argv], check=check, timeout=timeout,
                   input=input)

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        run(["ip", "-n", self.ns[a], "link", "add", a_if, "type", "veth", "peer", "name", b_if,
             "netns", self.ns[b]])
        self.ip(a, "link", "set", a_if, "up")
        self.ip(b, "link", "set", b_if, "up")

    def _addr(self, role: str, dev: str, *cidrs: str) -> None:
        for cidr in cidrs:
            extra = ["nodad"] if ":" in cidr else []  # usable at once, no 1-2 s of DAD
            self.ip(role, "addr", "add", cidr, "dev", dev, *extra)

    def _build(self) -> None:
        for role, name in self.ns.items():
            run(["ip", "netns", "add", name])
            self.created.append(name)
            self.ip(role, "link", "set", "lo", "up")
            # ip netns exec bind-mounts this over /etc/resolv.conf: each namespace has its
            # own, and the root's is never what a test changes.
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(self.initial_resolv_conf(role))
        for i in range(1, self.clients + 1):
            client = f"client{i}"
            self._veth(client, "c0", "router", f"r{i}")
            self._addr(client, "c0", f"10.0.1{i}.2/24", f"fd00:1{i}::2/64")
            self._addr("router", f"r{i}", f"10.0.1{i}.1/24", f"fd00:1{i}::1/64")
            self.ip(client, "route", "add", "default", "via", f"10.0.1{i}.1")
            self.ip(client, "-6", "route", "add", "default", "via", f"fd00:1{i}::1")
        self._veth("router", "rs", "server", "s0")
        self._addr("router", "rs", "10.0.2.1/24", "fd00:2::1/64")
        self._addr("server", "s0", f"{SERVER_IP}/24", "fd00:2::2/64")
        self.ip("router", "route", "add", "default", "via", SERVER_IP)
        self.ip("router", "-6", "route", "add", "default", "via", "fd00:2::2")
        self._veth("server", "si", "internet", "i0")
        self._addr("server", "si", "203.0.113.1/24", "2001:db8:3::1/64")
        self._addr("internet", "i0", f"{INTERNET_IP}/24", f"{INTERNET_IP6}/64")
        self.ip("server", "route", "add", "10.0.0.0/8", "via", "10.0.2.1")
        self.ip("server", "-6", "route", "add", "fd00::/8", "via", "fd00:2::1")
        self.ip("internet", "route", "add", "default", "via", "203.0.113.1")
        self.ip("internet", "-6", "route", "add", "default", "via", "2001:db8:3::1")
        forwarders = ["router", "server"]
        if self.guest:
            # guest1 (10.0.31.2, fd00:31::2) -- client1 -- router: routed both ways, so a
            # leak of what client1 forwards would work, and the router would see it.
            self._veth("client1", "cg", "guest1", "g0")
            self._addr("client1", "cg", GUEST_GATEWAY + "/24", "fd00:31::1/64")
            self._addr("guest1", "g0", f"{GUEST_IP}/24", "fd00:31::2/64")
            self.ip("guest1", "route", "add", "default", "via", GUEST_GATEWAY)
            self.ip("guest1", "-6", "route", "add", "default", "via", "fd00:31::1")
            self.ip("router", "route", "add", "10.0.31.0/24", "via", "10.0.11.2")
            self.ip("router", "-6", "route", "add", "fd00:31::/64", "via", "fd00:11::2")
            forwarders.append("client1")
        for role in forwarders:
            self.exec(role, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                      "net.ipv6.conf.all.forwarding=1")
        self._start_internet()

    def initial_resolv_conf(self, role: str) -> str:
        if role == "server":
            return f"nameserver {INTERNET_IP}\n"
        if role == "internet":
            return "nameserver 127.0.0.1\n"
        return f"nameserver {LAN_RESOLVER}\nsearch lan\n"

    def resolv_conf(self, role: str) -> str:
        return (Path("/etc/netns") / self.ns[role] / "resolv.conf").read_text()

    def _start_internet(self) -> None:
        www = self.dir / "www"
        www.mkdir()
        (www / "index.html").write_text("<html><body>hello from the internet</body></html>\n")
        (www / "big.bin").write_bytes(os.urandom(16 * 1024 * 1024))
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.dir, root=www))
        self.start("internet", "nginx", [shutil.which("nginx") or "/usr/sbin/nginx",
                                         "-p", str(self.dir), "-c", str(conf)])
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.start("internet", "dnsmasq", [
            dnsmasq, "--keep-in-foreground", "--no-daemon", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", f"--pid-file={self.dir}/dnsmasq.pid", "--user=root",
            f"--listen-address={INTERNET_IP}", f"--listen-address={INTERNET_IP6}",
            "--bind-interfaces",
            f"--address=/{WEB_NAME}/{INTERNET_IP}", f"--address=/{WEB_NAME}/{INTERNET_IP6}"])
        self.start("internet", "iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)])
        self.start("internet", "udpecho", [sys.executable, "-c", UDP_ECHO, str(UDP_ECHO_PORT)])
        self.wait_tcp("internet", 80)
        self.wait_tcp("internet", IPERF_PORT)

    # ------------------------------------------------------------------ processes
    def start(self, role: str, name: str, argv: Sequence[str], *,
              stdout: bool = False) -> Proc:
        self._started += 1
        log = self.dir / f"{self._started:03d}-{name}.log"  # one per process, never reused
        with open(log, "ab") as err:
            popen = subprocess.Popen(["ip", "netns", "exec", self.ns[role], *argv],
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout else err, stderr=err)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> int:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(sig)
            try:
                proc.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def wait_tcp(self, role: str, port: int, timeout: float = 15.0) -> None:
        wait_until(lambda: self.exec(role, "ss", "-Hltn", f"sport = :{port}",
                                     check=False).stdout.strip(),
                   timeout, f"something listening on {role}:{port}")

    def wait_log(self, proc: Proc, text: str, timeout: float = 20.0, start: int = 0) -> None:
        def logged() -> bool:
            if text in proc.text()[start:]:
                return True
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited: {proc.text()[-3000:]}")
            return False

        wait_until(logged, timeout, lambda: f"{text!r} from {proc.name}: {proc.text()[-3000:]}")

    # ------------------------------------------------------------------ veil
    def start_server(self, *extra: str) -> tuple[Proc, str]:
        state = self.dir / "server-state"
        fresh = not state.exists()
        proc = self.start("server", "server", [*VEIL, "-v", "serve", "--self-signed",
                                               "--state", str(state),
                                               "--listen", f"{SERVER_IP}:{SERVER_PORT}",
                                               "--tun", *extra], stdout=fresh)
        key = ""
        if fresh:
            assert proc.popen.stdout is not None
            key = proc.popen.stdout.readline().decode().strip()
        self.wait_tcp("server", SERVER_PORT)
        return proc, key

    def add_user(self, name: str) -> str:
        out = self.exec("server", *VEIL, "user", "add", name, "--state",
                        str(self.dir / "server-state"))
        return out.stdout.strip()

    def revoke(self, name: str) -> None:
        self.exec("server", *VEIL, "user", "revoke", name, "--state",
                  str(self.dir / "server-state"))

    def start_client(self, key: str, role: str = "client1", *extra: str,
                     wait: bool = True) -> Proc:
        proc = self.start(role, f"{role}-veil",
                          [*VEIL, "-v", "connect", key, "--tun", *extra])
        if wait:
            self.wait_log(proc, "TUN veil0 up")
        return proc

    # ------------------------------------------------------------------ capture
    def capture(self, role: str = "router", iface: str = "r1") -> Capture:
        path = self.dir / f"capture-{role}-{iface}-{self._started}.pcap"
        # --immediate-mode: packets reach the file as they come, not when a ring-buffer
        # block fills (the last ones would be lost when tcpdump is stopped).
        proc = self.start(role, f"tcpdump-{iface}", [
            "tcpdump", "-Z", "root", "--immediate-mode", "-i", iface, "-n", "-U", "-s", "200",
            "-w", str(path)])
        self.wait_log(proc, "listening on", timeout=10)
        return Capture(self, proc, path)

    # ------------------------------------------------------------------ state
    def snapshot(self, role: str) -> dict[str, str]:
        """Routes, rules, firewall, links and resolver settings of a namespace."""
        def no_link_local(text: str) -> str:
            # The kernel adds link-local addresses and routes on its own schedule.
            return "\n".join(line for line in text.splitlines() if "fe80:" not in line)

        return {
            "routes4": self.ip(role, "-4", "route", "show", "table", "all"),
            "routes6": no_link_local(self.ip(role, "-6", "route", "show", "table", "all")),
            "addrs": no_link_local(self.ip(role, "-o", "addr", "show")),
            "rules": self.ip(role, "rule", "show"),
            "links": "\n".join(line.split("<")[0] for line in
                               self.ip(role, "-o", "link", "show").splitlines()),
            "nft": self.exec(role, "nft", "list", "ruleset").stdout,
            "resolv": self.resolv_conf(role),
        }

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, signal.SIGKILL if proc.name.startswith("tcpdump") else
                          signal.SIGTERM)
        for name in reversed(self.created):
            run(["ip", "netns", "del", name], check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        self.created.clear()
        if not os.environ.get("VEIL_KEEP_NETNS_LOGS"):  # to read the logs of a failure
            shutil.rmtree(self.dir, ignore_errors=True)


class Capture:
    """tcpdump on one interface; :meth:`packets` stops it and parses what it saw."""

    def __init__(self, topo: Topology, proc: Proc, path: Path) -> None:
        self.topo = topo
        self.proc = proc
        self.path = path

    def packets(self) -> list[Packet]:
        # Let the last packets reach the file (-U flushes per packet): nothing tells when
        # tcpdump has seen the last one.
        time.sleep(0.2)
        self.topo.stop(self.proc, signal.SIGINT)
        out: list[Packet] = []
        with open(self.path, "rb") as f:
            for _ts, raw in dpkt.pcap.Reader(f):
                out.append(Packet.parse(raw))
        return out


@dataclass(frozen=True)
class Packet:
    kind: str  # "ip", "arp", "link-local" (IPv6 neighbour discovery, MLD, router solicitation)
    src: str = ""
    dst: str = ""
    proto: int = 0
    sport: int = 0
    dport: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> Packet:
        import ipaddress

        eth = dpkt.ethernet.Ethernet(raw)
        ip = eth.data
        if isinstance(ip, dpkt.arp.ARP):
            return cls("arp")
        if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
            return cls(f"ethertype-{eth.type:#x}")
        src = str(ipaddress.ip_address(ip.src))
        dst = str(ipaddress.ip_address(ip.dst))
        proto = ip.p if isinstance(ip, dpkt.ip.IP) else ip.nxt
        l4 = ip.data
        if isinstance(ip, dpkt.ip6.IP6) and (
                src.startswith("fe80:") or dst.startswith("ff02:") or
                (isinstance(l4, dpkt.icmp6.ICMP6) and 133 <= l4.type <= 137)):
            # Neighbour discovery, MLD, router solicitation: link-local, never routed.
            return cls("link-local", src, dst, proto)
        sport = getattr(l4, "sport", 0)
        dport = getattr(l4, "dport", 0)
        return cls("ip", src, dst, proto, sport, dport)


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    sendfile on;
    server {{
        listen 80;
        listen [::]:80;
        # SMTP's port, which the server refuses to its clients by default (--refuse-ports).
        listen 25;
        root {root};
    }}
}}
"""

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""
