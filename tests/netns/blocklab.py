"""A blocked server and its CDN way in, in network namespaces: what tests/netns/test_blocking.py
proves and bench/blocking.py measures.

::

    [client 10.198.0.1] c0 ==== mc [middle] ms ==== s0 [server 10.198.0.2, 10.198.0.3]
    veil connect KEY             veil lab censor       veil serve on .2:443 --via https://cdn.test/S/
    (direct way first,           --rules FILE, or      nginx as a CDN on .3:443 (its own certificate
     the CDN way second)         the impair bridge     for cdn.test) -> https://10.198.0.2:443
    --forward :8080, --socks                           nginx file server on 127.0.0.1:80, UDP echo

The middle runs either the lab censor (rules switched at run time through its rules file) or
the user-space delay/loss bridge (tests/support/impair.py), never both. The CDN's address is a
second address of the server's namespace: a censor that blackholes the server's address leaves
the CDN reachable, as a real CDN's edge is elsewhere. The client resolves cdn.test through its
namespace's own /etc/hosts (``ip netns exec`` mounts /etc/netns/NAME/hosts) and trusts the
CDN's test CA through SSL_CERT_FILE, as a real client trusts the web PKI.

In TUN mode (tests/netns/test_blocking_tun.py: ``veil serve --tun``, ``start_tun_client``) the
downloads go to TUNNEL_TARGET_IP on the server's loopback, which the client reaches only
through its TUN device.

Which address carried a download is read from nftables counters in the client's namespace
(bytes received from each address), not from veil's log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from tests.netns.topology import NGINX_CONF, UDP_ECHO, VEIL, Proc, Topology, run
from tests.support.cdn import CDN_CONF, make_ca_and_leaf
from tests.support.impair import BridgeProcess, one_segment_per_frame
from tests.support.wait import wait_until

CLIENT_IP = "10.198.0.1"
SERVER_IP = "10.198.0.2"
CDN_IP = "10.198.0.3"
CDN_NAME = "cdn.test"
# veil's own port is not 443: a censor that resets every connection to the server's port
# must leave the CDN's HTTPS port alone (blocking all of 443 would block the CDN as well).
SERVER_PORT = 8443
CDN_PORT = 443
FORWARD_PORT = 8080
SOCKS_PORT = 1080
UDP_ECHO_PORT = 7777
# For a full-device tunnel (veil serve --tun): an address on the server's loopback, which the
# client reaches only through the tunnel (it has no route there but the TUN's).
TUNNEL_TARGET_IP = "198.51.100.80"
# The CDN as Cloudflare's defaults: cuts a request silent for 100 s.
CDN_READ_TIMEOUT_S = 100
# The "next download": big enough to be a download (many round trips, many TLS records),
# small enough to take well under a second on either path.
NEXT_SIZE = 1024 * 1024
# Each attempt at the next download gets this long (~0.1 s on either way here); one whose
# stream went onto a dead session before it was found dead hangs until then.
ATTEMPT_S = 4.0
# While none has worked, a new attempt starts this often (a user clicking again), so the
# figure is when the tunnel works again, to within this, not when a hung attempt gave up.
ATTEMPT_EVERY_S = 0.5
# How often the attempts are looked at.
POLL_S = 0.05
# The long download that is running when the block comes: sparse, never finished.
HUGE_SIZE = 1024 * 1024 * 1024
# The censor reads its rules file every 0.1 s and says so; a busy 2-core box may take longer.
RULES_APPLIED_S = 10.0
# Python start-up, the first TLS handshake and the key check, on a busy box.
UP_S = 30.0
# A veth's default gso_max_segs; 1 while the impair bridge runs, so that its loss
# hits segments, not 64 KiB super-frames.
GSO_MAX_SEGS_DEFAULT = 65535

# What the client logs (net/client_session.py) when it changes ways.
SWITCHED_AWAY = re.compile(r"direct path \S+ blocked \((?P<why>[^)]*(?:\([^)]*\))?[^)]*)\); "
                           r"using (?P<to>\S+)")
SWITCHED_BACK = re.compile(r"direct path \S+ works again; using it instead of (?P<old>\S+)")
EVERY_WAY_FAILED = "every way in failed"

COUNTERS = f"""
table inet blocklab {{
    chain input {{
        type filter hook input priority 0; policy accept;
        ip saddr {SERVER_IP} counter
        ip saddr {CDN_IP} counter
    }}
}}
"""


class BlockLab(Topology):
    """Three namespaces; veil's server, the CDN and a file server up; the middle and the
    client are started (and replaced) by the test."""

    def __init__(self, keepalive: str | None = None, cdn_locations: str = "") -> None:
        """``keepalive``: the client's --keepalive (None: veil's default); ``cdn_locations``:
        more nginx ``location`` blocks for the CDN's server (the bench's peer behind it)."""
        super().__init__(clients=0)
        self.cdn_locations = cdn_locations
        tag = secrets.token_hex(3)
        self.ns = {role: f"veil-b-{tag}-{role}" for role in ("client", "middle", "server")}
        self.keepalive = keepalive
        self.rules = self.dir / "censor.rules"
        self.state = self.dir / "server-state"
        self.www = self.dir / "www"
        self.cdn_dir = self.dir / "cdn"
        self.secret = "/" + secrets.token_hex(16) + "/"
        self.key = ""
        self.next_sha256 = ""
        self.censor: Proc | None = None
        self.bridged = False
        self.impair: BridgeProcess | None = None
        self.client: Proc | None = None
        self.server: Proc | None = None
        # Where the downloads go: through the client's --forward, or (TUN mode) straight to
        # the target behind the tunnel.
        self.base_url = f"http://127.0.0.1:{FORWARD_PORT}"

    def __enter__(self) -> BlockLab:
        super().__enter__()
        return self

    @property
    def via(self) -> str:
        return f"https://{CDN_NAME}{self.secret}"

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        for role, name in self.ns.items():
            run(["ip", "netns", "add", name])
            self.created.append(name)
            self.ip(role, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / self.ns["client"]
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{CDN_IP} {CDN_NAME}\n")
        # The middle's kernel must stay silent on the link (no IPv6 router solicitations).
        self.exec("middle", "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.default.disable_ipv6=1")
        self.ip("client", "link", "add", "c0", "type", "veth", "peer", "name", "mc",
                "netns", self.ns["middle"])
        self.ip("server", "link", "add", "s0", "type", "veth", "peer", "name", "ms",
                "netns", self.ns["middle"])
        self.ip("client", "addr", "add", f"{CLIENT_IP}/24", "dev", "c0")
        self.ip("server", "addr", "add", f"{SERVER_IP}/24", "dev", "s0")
        self.ip("server", "addr", "add", f"{CDN_IP}/24", "dev", "s0")
        for role, dev in (("client", "c0"), ("server", "s0"), ("middle", "mc"),
                          ("middle", "ms")):
            self.ip(role, "link", "set", dev, "up")
        self.exec("client", "nft", "-f", "-", input=COUNTERS)
        self._start_sites()
        self.use_censor()

    def _start_sites(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.www.mkdir()
        (self.www / "index.html").write_text("<html><body>behind the censor</body></html>\n")
        (self.www / "1k").write_bytes(bytes(1024))  # bench/probe.py ttfb's page
        body = os.urandom(NEXT_SIZE)
        (self.www / "next.bin").write_bytes(body)
        self.next_sha256 = hashlib.sha256(body).hexdigest()
        with open(self.www / "huge.bin", "wb") as huge:
            huge.truncate(HUGE_SIZE)
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.dir, root=self.www))
        self.start("server", "nginx", [nginx, "-p", str(self.dir), "-c", str(conf)])
        self.wait_tcp("server", 80)
        self.cdn_dir.mkdir()
        self.ca_file = make_ca_and_leaf(self.cdn_dir, CDN_NAME)
        conf_text = CDN_CONF.format(
            prefix=self.cdn_dir, listen=f"{CDN_IP}:{CDN_PORT}", name=CDN_NAME,
            origin=f"{SERVER_IP}:{SERVER_PORT}", read_timeout=CDN_READ_TIMEOUT_S, http2="",
            keepalive_requests=1000)
        # Other sites behind the same CDN go before its catch-all location (veil's origin).
        conf_text = conf_text.replace("        location / {", self.cdn_locations
                                      + "        location / {", 1)
        (self.cdn_dir / "nginx.conf").write_text(conf_text)
        self.start("server", "cdn-nginx", [nginx, "-p", str(self.cdn_dir), "-c",
                                           str(self.cdn_dir / "nginx.conf")])
        self.wait_tcp("server", CDN_PORT)
        self.start("server", "udp-echo", ["python3", "-c", UDP_ECHO, str(UDP_ECHO_PORT)])

    def close(self) -> None:
        try:
            self._stop_middle()
        finally:
            super().close()

    # ------------------------------------------------------------------ the middle
    def _stop_middle(self) -> None:
        if self.bridged:
            self.ip("middle", "link", "del", "br0")
            self.bridged = False
        if self.censor is not None:
            self.stop(self.censor)
            self.censor = None
        if self.impair is not None:
            self.impair.close()
            self.impair = None

    def _gso(self, segs: int) -> None:
        for role, dev in (("client", "c0"), ("server", "s0")):
            if segs == 1:
                one_segment_per_frame(self.ns[role], dev)
            else:
                self.ip(role, "link", "set", dev, "gso_max_segs", str(segs))

    def use_censor(self) -> None:
        """The lab censor in the middle, with no rules."""
        self._stop_middle()
        self._gso(GSO_MAX_SEGS_DEFAULT)
        self.rules.write_text("")
        self.censor = self.start("middle", "censor", [
            *VEIL, "lab", "censor", "--a", "mc", "--b", "ms", "--rules", str(self.rules)])
        self.wait_log(self.censor, "ready")

    def use_kernel_bridge(self) -> None:
        """A plain kernel bridge in the middle (nothing in the way: the bench's throughput)."""
        self._stop_middle()
        self._gso(GSO_MAX_SEGS_DEFAULT)
        self.ip("middle", "link", "add", "br0", "type", "bridge")
        for dev in ("mc", "ms"):
            self.ip("middle", "link", "set", dev, "master", "br0")
        self.ip("middle", "link", "set", "br0", "up")
        self.bridged = True

    def use_impair(self, delay_ms: float, loss: float) -> BridgeProcess:
        """The delay/loss bridge in the middle instead (``delay_ms`` each way)."""
        self._stop_middle()
        self._gso(1)
        self.impair = BridgeProcess(self.ns["middle"], "mc", "ms", self.dir / "impair.log",
                                    seed=16)
        self.impair.set("both", delay_ms=delay_ms, loss=loss)
        return self.impair

    def set_rules(self, text: str) -> float:
        """Write the censor's rules (atomically) and wait until it applied them; returns the
        moment it said so (time.monotonic())."""
        assert self.censor is not None
        if self.rules.read_text() == text:
            return time.monotonic()
        before = self.rules_applied()
        temporary = self.rules.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.rules)
        wait_until(lambda: self.rules_applied() > before, RULES_APPLIED_S,
                   "the censor applying the new rules", poll=0.02)
        return time.monotonic()

    def rules_applied(self) -> int:
        assert self.censor is not None
        return sum(1 for line in self.censor.text().splitlines()
                   if line.startswith("{") and json.loads(line).get("event") == "rules")

    # ------------------------------------------------------------------ veil
    def start_veil_server(self, *extra: str) -> str:
        """``veil serve`` with the CDN way, and ``extra`` options (--tun, --admin, --on-block)."""
        fresh = not self.state.exists()
        self.server = self.start("server", "server", [
            *VEIL, "-v", "serve", "--self-signed", "--state", str(self.state), "--listen",
            f"{SERVER_IP}:{SERVER_PORT}", "--allow-private", "--via", self.via, *extra],
            stdout=fresh)
        if fresh:
            assert self.server.popen.stdout is not None
            self.key = self.server.popen.stdout.readline().decode().strip()
        wait_until(lambda: self.exec("server", "ss", "-Hltn", f"src {SERVER_IP}:{SERVER_PORT}",
                                     check=False).stdout.strip(), UP_S, "veil listening")
        return self.key

    def start_veil_client(self, *extra: str, key: str | None = None) -> Proc:
        """``veil connect`` with the server's key (or ``key``), logging at -v."""
        keepalive = ("--keepalive", self.keepalive) if self.keepalive else ()
        self.client = self.start("client", "client", [
            "env", f"SSL_CERT_FILE={self.ca_file}", *VEIL, "-v", "connect", key or self.key,
            "--forward", f"127.0.0.1:{FORWARD_PORT}:127.0.0.1:80",
            "--socks", f"127.0.0.1:{SOCKS_PORT}", *keepalive, *extra])
        self.wait_log(self.client, "connected to ", timeout=UP_S)
        return self.client

    def start_tun_client(self) -> Proc:
        """``veil connect KEY --tun`` (the server must run with ``--tun``); downloads go to
        the target behind the tunnel from then on."""
        self.ip("server", "addr", "add", f"{TUNNEL_TARGET_IP}/32", "dev", "lo", check=False)
        # The client's own resolv.conf (ip netns exec mounts it over /etc/resolv.conf), which
        # TUN mode rewrites: without it the rewrite would reach the root namespace's.
        (Path("/etc/netns") / self.ns["client"] / "resolv.conf").write_text(
            f"nameserver {SERVER_IP}\n")
        self.base_url = f"http://{TUNNEL_TARGET_IP}"
        keepalive = ("--keepalive", self.keepalive) if self.keepalive else ()
        self.client = self.start("client", "client-tun", [
            "env", f"SSL_CERT_FILE={self.ca_file}", *VEIL, "-v", "connect", self.key, "--tun",
            *keepalive])
        self.wait_log(self.client, "TUN veil0 up", timeout=UP_S)
        return self.client

    def restart_client(self) -> Proc:
        if self.client is not None:
            self.stop(self.client)
        return self.start_veil_client()

    # ------------------------------------------------------------------ traffic
    def curl_argv(self, path: str, out: Path | str, max_time: float, *extra: str) -> list[str]:
        return ["curl", "-sS", "--max-time", f"{max_time:g}", "-o", str(out), *extra,
                f"{self.base_url}/{path}"]

    def fetch_next(self, max_time: float) -> bool:
        """The 1 MiB file through the forward, byte-exact within ``max_time`` seconds."""
        out = self.dir / "next.out"
        out.unlink(missing_ok=True)
        done = self.exec("client", *self.curl_argv("next.bin", out, max_time), check=False,
                         timeout=max_time + 10)
        return done.returncode == 0 and self.is_next(out)

    def is_next(self, out: Path) -> bool:
        """``out`` holds the whole next file, byte-exact."""
        return out.exists() and hashlib.sha256(out.read_bytes()).hexdigest() == self.next_sha256

    def time_to_working(self, since: float, within: float) -> float:
        """Start the next download every ATTEMPT_EVERY_S, as a user retrying would, until one
        succeeds; seconds from ``since`` to the first success (AssertionError after
        ``within``)."""
        attempts: list[tuple[float, Proc, Path]] = []
        try:
            while time.monotonic() < since + within + ATTEMPT_S:
                now = time.monotonic()
                if now < since + within and (
                        not attempts or now - since >= attempts[-1][0] + ATTEMPT_EVERY_S):
                    out = self.dir / f"next-{len(attempts)}.out"
                    out.unlink(missing_ok=True)
                    curl = self.start("client", "curl-next",
                                      self.curl_argv("next.bin", out, ATTEMPT_S))
                    attempts.append((now - since, curl, out))
                for started, proc, out in attempts:
                    if not proc.alive() and proc.popen.returncode == 0 and self.is_next(out):
                        took = time.monotonic() - since
                        print(f"the next download: {len(attempts)} started, the first to work "
                              f"started {started:.1f} s after the block, done at {took:.1f} s")
                        return took
                time.sleep(POLL_S)
            raise AssertionError(f"no download worked within {within} s of the block:\n"
                                 f"{self.log_since(0)[-3000:]}")
        finally:
            for _, proc, _ in attempts:
                self.stop(proc)

    def received(self) -> dict[str, int]:
        """Bytes the client's namespace received from each address so far."""
        table = json.loads(self.exec("client", "nft", "-j", "list", "table", "inet",
                                     "blocklab").stdout)
        out = {SERVER_IP: 0, CDN_IP: 0}
        for item in table["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            source = counted = None
            for expr in rule["expr"]:
                if "match" in expr:
                    source = expr["match"]["right"]
                elif "counter" in expr:
                    counted = int(expr["counter"]["bytes"])
            if source in out and counted is not None:
                out[source] = counted
        return out

    def carrier_of_next(self, max_time: float = 10.0) -> str | None:
        """Download the next file; the address that carried it (None: it failed)."""
        before = self.received()
        if not self.fetch_next(max_time):
            return None
        after = self.received()
        grown = {address: after[address] - before[address] for address in after}
        carrier = max(grown, key=lambda address: grown[address])
        # The whole file came from that address, and at most keepalive-sized bits from the
        # other (a probe of the way left, a ping of its lingering session).
        assert grown[carrier] >= NEXT_SIZE, grown
        assert all(grown[a] < NEXT_SIZE // 4 for a in grown if a != carrier), grown
        return carrier

    def log_since(self, mark: int) -> str:
        assert self.client is not None
        return self.client.text()[mark:]

    def log_mark(self) -> int:
        assert self.client is not None
        return len(self.client.text())
