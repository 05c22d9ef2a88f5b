"""An active prober: the published repertoire of the GFW's probes, and how a server reacts.

Sources: Alice et al., "How China Detects and Blocks Shadowsocks", IMC 2020 (replays of a
recorded first packet, verbatim and with bytes 0, 0-7 and 62-63, 16, or 6 and 16 changed;
random probes of 7-9, 11-13, 15-17, 21-23, 32-34, 40-42, 48-50 and 221 bytes); Frolov et
al., "Detecting Probe-resistant Proxies", NDSS 2020 (a server betrays itself by how and
when it closes: FIN, RST or a timeout, and after how long; a prober gives up after ~10 s);
Ensafi et al., IMC 2015 (TLS and HTTP probes of Tor bridges). What is recorded for each
probe is what a prober can see: the bytes that came back, how the connection ended and when.

With a reference server (the website the target imitates), every probe goes to both and
each difference is a way to tell them apart. Without one, the reaction profile is checked
for the tells the papers list: no answer to anything, a close that depends on how many
bytes were sent, and a replay treated differently from its altered copies.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import re
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from veil.lab.certs import judge_certificate
from veil.lab.verdict import Verdict

NAME = "active-probing"
SOURCE = "Alice et al. IMC 2020; Frolov et al. NDSS 2020; Ensafi et al. IMC 2015"

# The prober of Alice et al. and Frolov et al. gives up after about 10 s.
DEFAULT_WAIT = 10.0
CONNECT_TIMEOUT = 5.0
# Probes run in parallel (the GFW's come from thousands of addresses at once); enough
# workers that a repertoire of timeouts takes a few waits, not dozens.
WORKERS = 16
# Two closes differ in timing when they are further apart than this and than half the
# longer one (loopback and CI machines jitter by tens of milliseconds).
TIMING_SLACK = 1.0
# A probe reads at most this much of an answer (a website's page is far less); a server
# still sending after it is recorded as such, not read to the end.
RECV_LIMIT = 1 << 20

GFW_LENGTHS = (7, 8, 9, 11, 12, 13, 15, 16, 17, 21, 22, 23, 32, 33, 34, 40, 41, 42, 48, 49, 50,
               221)
# (name, byte positions changed) of the altered replays of Alice et al. 2020 (Table 3).
REPLAY_CHANGES = (("replay", ()), ("replay-byte0", (0,)), ("replay-bytes0-7,62-63",
                  (0, 1, 2, 3, 4, 5, 6, 7, 62, 63)), ("replay-byte16", (16,)),
                  ("replay-bytes6,16", (6, 16)))

DATE = re.compile(rb"\r\nDate: [^\r]*")


# ------------------------------------------------------------------ probes and reactions
@dataclass(frozen=True)
class Probe:
    """One probe: bytes sent on a fresh TCP connection, in clear or after a TLS handshake."""

    name: str
    payload: bytes
    tls: bool = False
    sni: str | None = None
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reaction:
    """What came back: bytes, how the connection ended, and when (timing is not compared
    by ``==``; :func:`differences` compares it with a tolerance)."""

    data: bytes
    close: str
    """``fin``, ``rst``, ``timeout`` (still open when the prober gave up), ``close_notify``
    (TLS probes), ``refused``, ``tls_failed:<why>`` or ``tls_error:<alert>``."""
    elapsed: float = field(default=0.0, compare=False)
    """Seconds from the probe's last byte sent to the end (or to giving up)."""

    def normalised(self) -> Reaction:
        """The reaction with what differs on every connection blanked: HTTP Date headers,
        and a TLS server's handshake bytes (randoms, keys, certificate) reduced to the
        record and message types, alerts kept whole."""
        return Reaction(tls_shape(DATE.sub(b"\r\nDate: -", self.data)), self.close,
                        self.elapsed)

    def describe(self) -> str:
        data = self.data[:48]
        more = "..." if len(self.data) > 48 else ""
        return f"{self.close} after {self.elapsed:.2f}s, {len(self.data)} B {data!r}{more}"

    def to_json(self) -> dict[str, Any]:
        return {"close": self.close, "elapsed": round(self.elapsed, 3),
                "bytes": len(self.data), "data": self.data[:256].hex()}


def tls_shape(data: bytes) -> bytes:
    """TLS records from a server reduced to what does not change between connections."""
    if len(data) < 5 or data[0] not in (21, 22) or data[1] != 3:
        return data
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        content_type, _version, length = struct.unpack_from("!BHH", data, pos)
        body = data[pos + 5:pos + 5 + length]
        if content_type == 21:
            out += b"alert:" + body.hex().encode() + b";"
        elif content_type == 22 and body:
            out += b"handshake:" + str(body[0]).encode() + b";"
        else:
            out += b"record:" + str(content_type).encode() + b";"
        pos += 5 + length
    if pos < len(data):
        out += b"trailing:" + str(len(data) - pos).encode()
    return bytes(out)


def _client_context(alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def _read_until_close(sock: socket.socket | ssl.SSLSocket, deadline: float,
                      started: float) -> Reaction:
    chunks: list[bytes] = []
    size = 0

    def done(close: str) -> Reaction:
        return Reaction(b"".join(chunks), close, time.monotonic() - started)

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return done("timeout")
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return done("timeout")
        except ssl.SSLEOFError:
            return done("fin")
        except ConnectionResetError:
            return done("rst")
        except ssl.SSLError as exc:
            return done(f"tls_error:{exc.reason}")
        except OSError as exc:
            return done(f"error:{exc.errno}")
        if not data:
            return done("close_notify" if isinstance(sock, ssl.SSLSocket) else "fin")
        chunks.append(data)
        size += len(data)
        if size > RECV_LIMIT:
            return done("still-sending")


def run_probe(host: str, port: int, probe: Probe, wait: float = DEFAULT_WAIT) -> Reaction:
    """Send one probe on a fresh connection and record the reaction."""
    try:
        raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except ConnectionRefusedError:
        return Reaction(b"", "refused")
    except OSError as exc:
        return Reaction(b"", f"connect_failed:{type(exc).__name__}")
    sock: socket.socket | ssl.SSLSocket = raw
    try:
        if probe.tls:
            try:
                sock = _client_context(probe.alpn).wrap_socket(
                    raw, server_hostname=probe.sni, suppress_ragged_eofs=False)
            except (ssl.SSLError, OSError) as exc:
                return Reaction(b"", f"tls_failed:{type(exc).__name__}")
        started = time.monotonic()
        if probe.payload:
            try:
                sock.sendall(probe.payload)
            except (ConnectionResetError, BrokenPipeError):
                return Reaction(b"", "rst", time.monotonic() - started)
            started = time.monotonic()
        return _read_until_close(sock, started + wait, started)
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def fetch_certificate(host: str, port: int, sni: str | None) -> bytes | None:
    """The server's leaf certificate (DER) for this SNI, as a prober would fetch it."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as raw, \
                _client_context().wrap_socket(raw, server_hostname=sni) as tls:
            return tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError):
        return None


# ------------------------------------------------------------------ the repertoire
HTTP_PROBES = (
    ("http-get", b"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0\r\n"
                 b"Accept: */*\r\n\r\n"),
    ("http-get-missing", b"GET /nonexistent-7f3a HTTP/1.1\r\nHost: {host}\r\n"
                         b"Connection: close\r\n\r\n"),
    ("http-head-1.0", b"HEAD / HTTP/1.0\r\n\r\n"),
    ("http-incomplete", b"GET / HTTP/1.1\r\n"),
    ("http-empty-lines", b"\r\n\r\n"),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
)
BROKEN_TLS_PROBES = (
    ("tls-short-hello", b"\x16\x03\x01\x00\x05hello"),
    ("tls-garbage-hello", b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 2),
    ("tls-zero-hello", b"\x16\x03\x03\x00\x30\x01\x00\x00\x2c" + bytes(44)),
    ("tls-huge-length", b"\x16\x03\x01\xff\xff" + bytes(100)),
    ("sslv2-hello", b"\x80\x2e\x01\x00\x02" + bytes(43)),
    ("tls-alert", b"\x15\x03\x03\x00\x02\x02\x28"),
    ("tls-appdata-first", b"\x17\x03\x03\x00\x10" + bytes(16)),
)


def _alter(first: bytes, positions: tuple[int, ...], rng: random.Random) -> bytes:
    data = bytearray(first)
    for i in positions:
        if i < len(data):
            data[i] = (data[i] + rng.randrange(1, 256)) % 256
    return bytes(data)


def repertoire(seed: int = 0, replay: bytes | None = None, host: str = "localhost",
               sni: str | None = None, tls: bool = True) -> list[Probe]:
    """The probes, in a fixed order: silence, random lengths, replays, HTTP, TLS."""
    rng = random.Random(seed)
    probes = [Probe("silence", b"")]
    probes += [Probe(f"random-{n}", rng.randbytes(n)) for n in GFW_LENGTHS]
    if replay:
        probes += [Probe(name, _alter(replay, changes, rng)) for name, changes in REPLAY_CHANGES]
    probes += [Probe(name, raw.replace(b"{host}", host.encode())) for name, raw in HTTP_PROBES]
    probes += [Probe(name, raw) for name, raw in BROKEN_TLS_PROBES]
    if tls:
        get = HTTP_PROBES[0][1].replace(b"{host}", (sni or host).encode())
        probes += [
            Probe("tls-silence", b"", tls=True, sni=sni),
            Probe("tls-http-get", get, tls=True, sni=sni),
            Probe("tls-http-get-alpn", get, tls=True, sni=sni, alpn=("h2", "http/1.1")),
            Probe("tls-random-221", rng.randbytes(221), tls=True, sni=sni),
            Probe("tls-random-64", rng.randbytes(64), tls=True, sni=sni),
            Probe("tls-http-get-no-sni", HTTP_PROBES[0][1].replace(b"{host}", host.encode()),
                  tls=True, sni=None),
        ]
        for name, raw in HTTP_PROBES[1:3]:
            probes.append(Probe(f"tls-{name}", raw.replace(b"{host}", (sni or host).encode()),
                                tls=True, sni=sni))
    return probes


# ------------------------------------------------------------------ comparing and judging
@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    target: Reaction
    reference: Reaction | None = None


def differences(results: list[ProbeResult]) -> list[str]:
    """Every probe where target and reference can be told apart, described."""
    out = []
    for r in results:
        if r.reference is None:
            continue
        a, b = r.target.normalised(), r.reference.normalised()
        if a != b:
            what = "close" if a.close != b.close else "answer"
            out.append(f"{r.probe.name} ({len(r.probe.payload)} B): {what} differs: "
                       f"target {r.target.describe()} vs reference {r.reference.describe()}")
            continue
        closed = a.close not in ("timeout", "still-sending")
        gap = abs(a.elapsed - b.elapsed)
        if closed and gap > TIMING_SLACK and gap > 0.5 * max(a.elapsed, b.elapsed):
            out.append(f"{r.probe.name} ({len(r.probe.payload)} B): timing differs: target "
                       f"{a.close} after {a.elapsed:.2f}s vs reference after {b.elapsed:.2f}s")
    return out


def profile_tells(results: list[ProbeResult]) -> list[str]:
    """Without a reference: the reaction patterns that betray a proxy."""
    tells = []
    by_name = {r.probe.name: r.target for r in results}
    answered = [r for r in results if r.target.data]
    if results and not answered:
        tells.append("no probe got a single byte back (HTTP and TLS probes included): "
                     "not how a website behaves")
    randoms = sorted((len(r.probe.payload), r.target.close) for r in results
                     if r.probe.name.startswith("random-"))
    changes = [f"{randoms[i - 1][1]} at {randoms[i - 1][0]} B -> {randoms[i][1]} at "
               f"{randoms[i][0]} B" for i in range(1, len(randoms))
               if randoms[i][1] != randoms[i - 1][1]]
    # One or two changes along the length axis is a threshold (Frolov et al.: a timeout
    # below N bytes, FIN at N, RST above); more is content-dependent, not length-dependent.
    if 1 <= len(changes) <= 2:
        tells.append("the close depends on how many random bytes were sent "
                     "(a server that reads a fixed-size header): " + "; ".join(changes))
    if "replay" in by_name:
        verbatim = by_name["replay"].normalised()
        altered = [by_name[n].normalised() for n, _ in REPLAY_CHANGES[1:] if n in by_name]
        if altered and all(a != verbatim for a in altered):
            tells.append("a verbatim replay gets a different reaction from every altered "
                         f"copy ({by_name['replay'].describe()}): the replay was accepted")
    return tells


@dataclass(frozen=True)
class ProbeReport:
    target: str
    reference: str | None
    results: list[ProbeResult]
    differences: list[str]
    tells: list[str]
    certificate: Verdict | None

    @property
    def verdict(self) -> Verdict:
        evidence = self.differences if self.reference else self.tells
        if evidence:
            label = "differs-from-reference" if self.reference else "proxy-reaction-profile"
            return Verdict(NAME, True, tuple(evidence), (label,),
                           details={"probes": len(self.results)})
        why = (f"all {len(self.results)} probes got the same reactions as {self.reference}"
               if self.reference else
               f"none of the proxy tells in {len(self.results)} probes")
        return Verdict(NAME, False, (why,), details={"probes": len(self.results)})

    @property
    def flagged(self) -> bool:
        """Flagged by its reactions or by its certificate: either alone gives a server away."""
        return self.verdict.flagged or (self.certificate is not None
                                        and self.certificate.flagged)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target, "reference": self.reference,
            "flagged": self.flagged,
            "verdict": self.verdict.to_json(),
            "certificate": self.certificate.to_json() if self.certificate else None,
            "probes": [{"name": r.probe.name, "tls": r.probe.tls,
                        "sent": len(r.probe.payload),
                        "target": r.target.to_json(),
                        "reference": r.reference.to_json() if r.reference else None}
                       for r in self.results],
        }


def split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def unreachable(target: str) -> str | None:
    """Why ``target`` (HOST:PORT) takes no TCP connection at all, or None when it does: a
    closed port is no website to compare, and a verdict on it would only mislead."""
    host, port = split_host_port(target)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except ConnectionRefusedError:
        return f"cannot connect to {target}: connection refused (nothing listens there)"
    except TimeoutError:
        return f"cannot connect to {target}: no answer within {CONNECT_TIMEOUT:g} s"
    except OSError as exc:
        return f"cannot connect to {target}: {exc.strerror or exc}"
    return None


def probe_server(target: str, reference: str | None = None, *, wait: float = DEFAULT_WAIT,
                 seed: int = 0, replay: bytes | None = None, sni: str | None = None,
                 tls: bool = True, workers: int = WORKERS) -> ProbeReport:
    """Run the repertoire against ``target`` (and ``reference``) and judge the reactions."""
    host, port = split_host_port(target)
    if sni is None and not _is_ip(host):
        sni = host
    probes = repertoire(seed, replay, host=sni or host, sni=sni, tls=tls)
    ref = split_host_port(reference) if reference else None
    # Each probe goes to both servers side by side, so both answer under the same load.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = [(pool.submit(run_probe, host, port, p, wait),
                    pool.submit(run_probe, ref[0], ref[1], p, wait) if ref else None)
                   for p in probes]
        results = [ProbeResult(p, mine.result(), theirs.result() if theirs else None)
                   for p, (mine, theirs) in zip(probes, pending, strict=True)]
    certificate = None
    if tls:
        der = fetch_certificate(host, port, sni)
        if der is not None:
            certificate = judge_certificate(der, sni)
    return ProbeReport(target, reference, results, differences(results) if ref else [],
                       profile_tells(results), certificate)


def format_text(report: ProbeReport) -> str:
    lines = [f"probed {report.target}" + (f" against {report.reference}" if report.reference
                                          else "") + f": {len(report.results)} probes"]
    for r in report.results:
        line = f"  {r.probe.name:<24} target: {r.target.describe()}"
        if r.reference is not None:
            same = r.target.normalised() == r.reference.normalised()
            line += "   (same as reference)" if same else \
                f"\n  {'':<24} reference: {r.reference.describe()}"
        lines.append(line)
    if report.certificate is not None:
        c = report.certificate
        lines.append(f"certificate: {'FLAGGED' if c.flagged else 'ok'}")
        lines.extend(f"  - {e}" for e in c.evidence)
    v = report.verdict
    lines.append(f"reactions: {'FLAGGED' if v.flagged else 'pass'}")
    lines.extend(f"  - {e}" for e in v.evidence)
    by = [what for what, verdict in (("the reactions", v), ("the certificate", report.certificate))
          if verdict is not None and verdict.flagged]
    lines.append(f"verdict: FLAGGED by {' and '.join(by)}" if by else "verdict: passes")
    return "\n".join(lines)
