"""Fully encrypted traffic: the GFW's passive rule of November 2021.

Source: Mingshi Wu et al., "How the Great Firewall of China Detects and Blocks Fully
Encrypted Traffic", USENIX Security 2023 (Algorithm 1). The firewall looks at the first
data-carrying packet the client sends on a TCP connection and lets the connection through
if ANY exemption holds:

- Ex1: the average number of set bits per byte is <= 3.4 or >= 4.6;
- Ex2: the first 6 bytes are printable ASCII (0x20-0x7e);
- Ex3: more than 50% of the bytes are printable;
- Ex4: more than 20 contiguous bytes are printable;
- Ex5: the first bytes match TLS (``[\\x16-\\x17]\\x03[\\x00-\\x09]``) or HTTP
  (``GET``, ``PUT``, ``POST``, ``HEAD`` followed by a space, and the other methods).

Otherwise the connection is "fully encrypted" and may be blocked (26.3% of such connections
towards data-centre ranges were, followed by 180 s of blocking of the server's triple). This
detector flags every such connection: it says what the firewall may block, not what a given
connection's dice would have decided. It does not model the server-IP-range and port
conditions of the paper (those are about where the rule is applied, not what it matches).
"""

from __future__ import annotations

import re

from veil.lab.flow import Flow
from veil.lab.verdict import Verdict

NAME = "fully-encrypted"
SOURCE = "Wu et al., USENIX Security 2023, Algorithm 1"

POPCOUNT_LOW = 3.4
POPCOUNT_HIGH = 4.6
PRINTABLE_PREFIX = 6
PRINTABLE_FRACTION = 0.5
PRINTABLE_RUN = 20
TLS_PREFIX = re.compile(rb"[\x16\x17]\x03[\x00-\x09]")
HTTP_PREFIX = re.compile(rb"(GET|PUT|POST|HEAD|DELETE|OPTIONS|CONNECT|PATCH|TRACE) ")


def is_printable(byte: int) -> bool:
    return 0x20 <= byte <= 0x7E


def average_popcount(data: bytes) -> float:
    return sum(b.bit_count() for b in data) / len(data) if data else 0.0


def longest_printable_run(data: bytes) -> int:
    best = run = 0
    for b in data:
        run = run + 1 if is_printable(b) else 0
        best = max(best, run)
    return best


def exemptions(data: bytes) -> list[str]:
    """The exemptions (Ex1..Ex5) that let ``data``, a first packet, through; each explained."""
    out = []
    popcount = average_popcount(data)
    if popcount <= POPCOUNT_LOW or popcount >= POPCOUNT_HIGH:
        out.append(f"Ex1: {popcount:.2f} set bits per byte is outside "
                   f"({POPCOUNT_LOW}, {POPCOUNT_HIGH})")
    if len(data) >= PRINTABLE_PREFIX and all(is_printable(b) for b in data[:PRINTABLE_PREFIX]):
        out.append("Ex2: the first 6 bytes are printable")
    printable = sum(1 for b in data if is_printable(b))
    if printable > PRINTABLE_FRACTION * len(data):
        out.append(f"Ex3: {100 * printable / len(data):.0f}% of the bytes are printable")
    run = longest_printable_run(data)
    if run > PRINTABLE_RUN:
        out.append(f"Ex4: {run} contiguous printable bytes")
    if TLS_PREFIX.match(data):
        out.append("Ex5: starts like a TLS record")
    elif HTTP_PREFIX.match(data):
        out.append("Ex5: starts like an HTTP request")
    return out


def judge_packet(data: bytes) -> Verdict:
    """The rule applied to one first packet."""
    details = {"length": len(data), "popcount": round(average_popcount(data), 3),
               "printable_fraction": round(
                   sum(1 for b in data if is_printable(b)) / len(data), 3) if data else 0.0,
               "longest_printable_run": longest_printable_run(data)}
    exempt = exemptions(data)
    if exempt:
        return Verdict(NAME, False, tuple(exempt), details=details)
    return Verdict(NAME, True, (
        f"first client packet ({len(data)} bytes) matches no exemption: "
        f"{details['popcount']} set bits per byte, "
        f"{100 * float(details['printable_fraction']):.0f}% printable, "
        f"longest printable run {details['longest_printable_run']}, "
        "not TLS or HTTP",), labels=("fully-encrypted",), details=details)


def detect(flow: Flow) -> Verdict:
    if flow.transport != "tcp":
        return Verdict.not_applicable(NAME, "the rule applies to TCP only")
    if flow.first_client_packet is None:
        return Verdict.not_applicable(NAME, "the client sent no data")
    return judge_packet(flow.first_client_packet)
