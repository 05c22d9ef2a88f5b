"""``veil lab``: the censor lab's command-line arguments (the runners are in
:mod:`veil.lab.commands`, imported only when a lab command runs, so ``veil --help`` stays
fast)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# The idle detector's defaults: pure stdlib code, cheap enough for `veil --help`.
from veil.lab.idle import MOMENT_GAP as MOMENT_GAP_S
from veil.lab.idle import NGINX_KEEPALIVE_TIMEOUT as NGINX_KEEPALIVE_TIMEOUT_S

IDLE_HELP = """\
The idle-heartbeat detector judges each TLS connection's whole life: a browser's connection
to nginx goes quiet when its requests are done and nginx closes it after keepalive_timeout;
a tunnel's is kept alive by small records at a fixed period. It flags four or more quiet
moments (opened by records of at most 64 bytes) at a near-fixed period ("heartbeat"), and a
connection open and quiet for longer than keepalive_timeout + 2 s ("immortal"; a
connection still open at the capture's end was open until its last packet).
"""


def _add_idle_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("idle-heartbeat detector", IDLE_HELP)
    group.add_argument("--keepalive-timeout", type=float, default=NGINX_KEEPALIVE_TIMEOUT_S,
                       metavar="SECONDS",
                       help="keepalive_timeout of the nginx the server passes for: a "
                            "connection quiet for longer is 'immortal' (default: nginx's "
                            f"{NGINX_KEEPALIVE_TIMEOUT_S:g})")
    group.add_argument("--moment-gap", type=float, default=MOMENT_GAP_S, metavar="SECONDS",
                       help="records closer together than this are one moment (a ping and "
                            "its answer): more than the path's round trip, less than the "
                            f"heartbeat period (default {MOMENT_GAP_S:g})")

CENSOR_RULES_HELP = """\
rules, after THREATS.md section 8:
  --block-ip        a null-routed server (Iran 2023, China): packets vanish, connects time out
  --block-port      the GFW's 20 Aug 2025 blocking of TCP/443 (with --inject-rst: RST+ACK both ways)
  --block-sni       the GFW's SNI filter (RSTs with --inject-rst, then the triple for 90 s)
  --throttle-after  Iran's throttling; with the default --throttle-drop 1, Russia's freeze
                    after ~16 KB (--throttle-ip: only connections to those addresses)
--inject-rst applies to every block but --block-ip: port, SNI and detector blocks.

The rules file (--rules) has one rule a line, the options' names without dashes:
  block-ip 203.0.113.7 198.51.100.0/24
  block-port 443
  block-sni blocked.example
  inject-rst
  throttle-after 16384
  throttle-drop 0.5          # comment
  throttle-ip 203.0.113.7    # only connections to or from it
The rules in force are the command line's plus the file's (the file's throttle wins). The
file is compared with what was applied every 0.1 s; each change prints {"event": "rules",
...} once applied. Lifting a rule lets go at once of what it blocks (an SNI residual too).
Write the file atomically (a temporary file, then rename) so it is never read half written.
"""

LAB_DESCRIPTION = """\
The censor lab: judge traffic as a national firewall would, from bytes on the wire only.

  veil lab passive capture.pcap          every flow, each detector's verdict and why
  veil lab probe my.server:443 --reference real.website:443
                                         active probes; lists every difference
  veil lab installs a.example:443 b.example:443
                                         what two servers share that unrelated sites do not
  veil lab report a.pcap probe.json --html -o report.html
                                         a table per detector
  veil lab censor --a vc --b vs          an in-path censor between two interfaces

Detectors and their sources: docs/lab.md.
"""


def add_lab_parser(sub: Any) -> None:
    """Add ``lab`` and its subcommands to the ``veil`` subparsers ``sub``."""
    lab = sub.add_parser("lab", help="the censor lab: detectors, an active prober, a censor",
                         description=LAB_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    passive = lab_sub.add_parser(
        "passive", help="run every passive detector on the flows of a capture",
        description="Read pcap/pcapng captures and print, for every flow that carried data, "
                    "each detector's verdict and its evidence. Exit status 1 when a flow is "
                    "flagged.")
    passive.add_argument("captures", nargs="+", metavar="PCAP")
    passive.add_argument("--json", action="store_true", help="print JSON (one list of flows)")
    passive.add_argument("--all", action="store_true",
                         help="also show the detectors that passed each flow, and why")
    passive.add_argument("--blocklist", type=Path, metavar="FILE",
                         help="SNI block list: one domain per line (subdomains included)")
    _add_idle_options(passive)

    probe = lab_sub.add_parser(
        "probe", help="probe a server like the GFW does, optionally against a reference",
        description="Send the published active-probing repertoire (silence, random bytes of "
                    "the GFW's lengths, replays, HTTP and TLS probes) and record bytes, close "
                    "type and timing. With --reference, every probe also goes to the "
                    "reference and each difference is listed; exit status 1 when there is "
                    "one (without a reference: when the reactions show a proxy's tells).")
    probe.add_argument("target", metavar="HOST:PORT")
    probe.add_argument("--reference", metavar="HOST:PORT",
                       help="the server the target should be indistinguishable from")
    probe.add_argument("--json", action="store_true", help="print JSON")
    probe.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                       help="how long each probe waits for the server (default 10, as the GFW)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the random probes")
    probe.add_argument("--replay", metavar="HEX|@FILE",
                       help="a recorded first client packet to replay, verbatim and altered")
    probe.add_argument("--sni", metavar="NAME",
                       help="server name for TLS probes (default: HOST when it is a name)")
    probe.add_argument("--no-tls", action="store_true",
                       help="send only the probes in clear (for a target that is not TLS)")

    installs = lab_sub.add_parser(
        "installs", help="compare two servers as a scanner would: what do they share?",
        description="Fetch from each server what a scanner fetches (/, up to 4 pages it "
                    "links to, /robots.txt, /favicon.ico, a missing page, over HTTP/1.1 with "
                    "TLS unverified; and the certificate) and list, side by side, what the "
                    "two share that two unrelated nginx sites would not: the title, the set "
                    "of linked pages, a page's bytes, ETag or Last-Modified, a certificate "
                    "subject or an unusual lifetime. Exit status 1 when they share any.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    installs.add_argument("a", metavar="A", help="HOST:PORT (TLS), https://HOST[:PORT] or "
                                                 "http://HOST[:PORT]")
    installs.add_argument("b", metavar="B", help="the other server, in the same forms")
    installs.add_argument("--json", action="store_true",
                          help="print JSON (`veil lab report` shows it side by side)")

    censor = lab_sub.add_parser(
        "censor", help="an in-path censor: bridge two interfaces and block what is flagged",
        description="Bridge two interfaces (AF_PACKET sockets, Linux, root) in a network "
                    "namespace of their own and act as the GFW does: inspect the first "
                    "packets of every flow, drop the client-to-server packets of a flow a "
                    "blocking detector flags, and keep dropping that client's packets to "
                    "that server port for a residual period. Rules block without a detector "
                    "and can change while it runs (--rules). Prints 'ready', then one JSON "
                    "line per flagged flow and per connection a rule acts on; SIGTERM stops it.",
        epilog=CENSOR_RULES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    censor.add_argument("--a", required=True, metavar="IFACE", help="one end (e.g. the client's)")
    censor.add_argument("--b", required=True, metavar="IFACE", help="the other end")
    censor.add_argument("--block", default="fully-encrypted,protocol-signatures,sni",
                        metavar="DETECTORS",
                        help="comma-separated detectors that block (default: fully-encrypted,"
                             "protocol-signatures,sni; also clienthello-fingerprint, tls-in-tls)")
    censor.add_argument("--residual", type=float, metavar="SECONDS",
                        help="residual blocking of the triple (default: 180, or 90 for SNI)")
    censor.add_argument("--probability", type=float, default=1.0, metavar="P",
                        help="chance a flagged flow is blocked (the GFW: 0.263 for fully "
                             "encrypted traffic; default 1)")
    censor.add_argument("--seed", type=int, help="seed of the probability and throttle draws")
    censor.add_argument("--blocklist", type=Path, metavar="FILE", help="SNI block list")
    rules = censor.add_argument_group("rules (no detector needed; see below)")
    rules.add_argument("--block-ip", action="append", default=[], metavar="ADDR[/LEN]",
                       help="blackhole an address or network: drop every packet to or from it, "
                            "never reset (repeatable)")
    rules.add_argument("--block-port", action="append", default=[], type=int, metavar="PORT",
                       help="block every TCP and UDP connection to a server port, both "
                            "directions (repeatable)")
    rules.add_argument("--block-sni", action="append", default=[], metavar="NAME",
                       help="block TLS connections whose SNI is NAME or a subdomain, and their "
                            "triple for the residual period (repeatable)")
    rules.add_argument("--inject-rst", action="store_true",
                       help="reset blocked TCP connections (forged RST+ACKs to both ends, with "
                            "the sequence numbers each expects) instead of dropping silently")
    rules.add_argument("--throttle-after", type=int, metavar="BYTES",
                       help="once a connection carried BYTES (both directions), drop "
                            "--throttle-drop of its packets")
    rules.add_argument("--throttle-drop", type=float, metavar="SHARE",
                       help="share of a throttled connection's packets dropped (0 to 1; "
                            "default 1: the connection freezes)")
    rules.add_argument("--throttle-ip", action="append", default=[], metavar="ADDR[/LEN]",
                       help="throttle only connections to or from this address or network "
                            "(repeatable; default: every connection)")
    rules.add_argument("--rules", type=Path, metavar="FILE",
                       help="more rules, read again whenever the file changes (a missing file "
                            "holds none)")

    report = lab_sub.add_parser(
        "report", help="a table per detector over captures and probe results",
        description="Summarise captures (pcap) and saved results (`lab passive --json`, "
                    "`lab probe --json`, `lab installs --json` files, *.json) as a table per "
                    "detector: flows seen, judged, flagged, and the evidence; each pair of "
                    "installs side by side, shared items flagged. Exit status 1 when anything "
                    "is flagged.")
    report.add_argument("inputs", nargs="+", metavar="PCAP|JSON")
    report.add_argument("--html", action="store_true", help="write HTML instead of text")
    report.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="write the report to FILE (default: standard output)")
    report.add_argument("--blocklist", type=Path, metavar="FILE",
                        help="SNI block list for the captures")
    _add_idle_options(report)
