#!/usr/bin/env python3
"""Measurements that run inside the client namespace; each prints one JSON object.

``probe.py ttfb``: sequential fresh connections, each one HTTP GET, either
straight to the web server or through a SOCKS5 proxy (no auth, CONNECT by
IPv4 address, each step waited for, as curl does). For each connection it
records the time from ``connect()`` until the whole body announced by
Content-Length has arrived (``body_ms``; the bodies are 1 KiB, one segment,
so this is the time to the first byte of the body) and until the first byte
of the response (``first_ms``). Timing stops at Content-Length, never at the
close: some proxies pass the close on seconds late.

``probe.py ping``: ICMP echo round trips (a raw socket; there is no ping
binary on the bench machine).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from typing import Any

# One stuck connection must not hang the bench.
CONNECT_TIMEOUT_S = 10.0
# After this many failures in a row the proxy is taken as broken.
MAX_CONSECUTIVE_ERRORS = 5
MAX_HEADER = 16 * 1024


class ProbeError(Exception):
    pass


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    sock.sendall(b"\x05\x01\x00")
    ver, method = recv_exact(sock, 2)
    if ver != 5 or method != 0:
        raise ProbeError(f"SOCKS5 method reply {ver},{method}")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    ver, rep, _, atyp = recv_exact(sock, 4)
    if ver != 5 or rep != 0:
        raise ProbeError(f"SOCKS5 CONNECT reply {ver},{rep}")
    if atyp == 1:
        recv_exact(sock, 4 + 2)
    elif atyp == 4:
        recv_exact(sock, 16 + 2)
    elif atyp == 3:
        recv_exact(sock, recv_exact(sock, 1)[0] + 2)
    else:
        raise ProbeError(f"SOCKS5 reply address type {atyp}")


def one_get(target: tuple[str, int], socks: tuple[str, int] | None,
            path: str) -> tuple[float, float]:
    """One fresh connection and GET; (ms to first response byte, ms to full body)."""
    host, port = target
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "User-Agent: veilbench\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    sock = socket.create_connection(socks or target, timeout=CONNECT_TIMEOUT_S)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if socks:
            socks5_connect(sock, host, port)
        sock.sendall(request)
        buf = bytearray()
        t_first = None
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ProbeError(f"closed before the headers ended ({len(buf)} bytes)")
            if t_first is None:
                t_first = time.perf_counter()
            buf += chunk
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > MAX_HEADER:
                raise ProbeError("response header too long")
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        if not head[0].startswith("HTTP/1.") or head[0].split()[1] != "200":
            raise ProbeError(f"bad status line {head[0]!r}")
        length = None
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length is None:
            raise ProbeError("no Content-Length")
        have = len(buf) - end - 4
        while have < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ProbeError(f"closed after {have} of {length} body bytes")
            have += len(chunk)
        t_body = time.perf_counter()
    finally:
        sock.close()
    return (t_first - t0) * 1000.0, (t_body - t0) * 1000.0


def cmd_ttfb(args: argparse.Namespace) -> dict[str, Any]:
    target = hostport(args.target)
    socks = hostport(args.socks) if args.socks else None
    first: list[float] = []
    body: list[float] = []
    errors: list[str] = []
    consecutive = 0
    for i in range(args.warmup + args.count):
        try:
            f, b = one_get(target, socks, args.path)
        except (OSError, ProbeError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            consecutive += 1
            if consecutive >= MAX_CONSECUTIVE_ERRORS:
                break
            continue
        consecutive = 0
        if i >= args.warmup:
            first.append(round(f, 4))
            body.append(round(b, 4))
    return {"first_ms": first, "body_ms": body, "errors": len(errors), "error_samples": errors[:3]}


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def cmd_ping(args: argparse.Namespace) -> dict[str, Any]:
    dst = args.host
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    lost = 0
    for seq in range(args.count):
        payload = struct.pack("!d", time.perf_counter()) + b"veilbench" * 4
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        pkt = struct.pack("!BBHHH", 8, 0, icmp_checksum(hdr + payload), ident, seq) + payload
        t0 = time.perf_counter()
        sock.sendto(pkt, (dst, 0))
        deadline = t0 + args.timeout
        got = False
        while not got:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(2048)
            except TimeoutError:
                break
            ihl = (data[0] & 0x0F) * 4
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if typ == 0 and rid == ident and rseq == seq:
                rtts.append(round((time.perf_counter() - t0) * 1000.0, 3))
                got = True
        if not got:
            lost += 1
        time.sleep(args.interval)
    return {"rtt_ms": rtts, "lost": lost}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("ttfb")
    t.add_argument("--target", required=True, help="web server HOST:PORT (IPv4)")
    t.add_argument("--socks", help="SOCKS5 proxy HOST:PORT; none = straight to the target")
    t.add_argument("--path", default="/1k")
    t.add_argument("--count", type=int, default=200)
    t.add_argument("--warmup", type=int, default=2, help="connections made first and not counted")
    g = sub.add_parser("ping")
    g.add_argument("host")
    g.add_argument("--count", type=int, default=10)
    g.add_argument("--interval", type=float, default=0.05)
    g.add_argument("--timeout", type=float, default=2.0)
    args = p.parse_args()
    result = cmd_ttfb(args) if args.cmd == "ttfb" else cmd_ping(args)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
