#!/usr/bin/env python3
"""The cost of a split-routing decision (veil.client.rules) with many rules.

Builds a rule set like the ones people load (by default 100,000 rules: domain suffixes and
IPv4/IPv6 CIDRs, mixed, plus a few keywords and a final MATCH), then times
``RuleSet.decide`` on a mix of destinations (names that hit a suffix, names that miss and
fall to MATCH, IPs inside and outside the networks) and prints microseconds per decision.
A decision is taken once per new TCP stream and once per new UDP destination of an
association, so this is the per-connection cost the issue asks for. Also prints how long
reading and compiling the files took (once, at start).

    PYTHONPATH=src python3 bench/rules.py [--rules 100000] [--decisions 200000] [--seed 1]
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import string
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from veil.client.rulefiles import load_rules
from veil.client.rules import RuleSet
from veil.protocol.address import Address

#: Keyword rules are scanned one by one (they cannot be indexed); real lists have a handful.
KEYWORDS = 20


def _label(rng: random.Random, low: int = 3, high: int = 12) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(low, high)))


def build(count: int, rng: random.Random, directory: Path) -> tuple[RuleSet, list[Address]]:
    """A rules file of ``count`` rules, half in a Clash list, half in a sing-box-like list
    pulled in by RULE-SET; and the destinations to decide."""
    suffixes = [f"{_label(rng)}.{rng.choice(['com', 'cn', 'net', 'org', 'com.cn'])}"
                for _ in range(count // 2)]
    networks: list[str] = []
    for _ in range(count - len(suffixes)):
        if rng.random() < 0.8:
            networks.append(str(ipaddress.IPv4Network((rng.getrandbits(32),
                                                       rng.randint(12, 24)), strict=False)))
        else:
            networks.append(str(ipaddress.IPv6Network((rng.getrandbits(128),
                                                       rng.randint(20, 48)), strict=False)))
    (directory / "domains.txt").write_text(
        "".join(f"DOMAIN-SUFFIX,{name}\n" for name in suffixes))
    (directory / "networks.txt").write_text(
        "".join(f"IP-CIDR,{net},no-resolve\n" for net in networks))
    rules_file = directory / "rules.txt"
    rules_file.write_text(
        "".join(f"DOMAIN-KEYWORD,{_label(rng, 8, 10)},BLOCK\n" for _ in range(KEYWORDS))
        + "RULE-SET,domains.txt,DIRECT\nRULE-SET,networks.txt,DIRECT\nMATCH,TUNNEL\n")
    started = time.perf_counter()
    rules = load_rules([str(rules_file)])
    print(f"load + compile: {time.perf_counter() - started:.2f} s")
    destinations = []
    for _ in range(1000):
        kind = rng.random()
        if kind < 0.35:  # a subdomain of a listed suffix
            destinations.append(Address(f"{_label(rng)}.{rng.choice(suffixes)}", 443))
        elif kind < 0.6:  # a name no rule lists: walks every suffix, then MATCH
            destinations.append(Address(f"www.{_label(rng)}.{_label(rng)}.io", 443))
        elif kind < 0.8:  # an address inside a listed network
            net = ipaddress.ip_network(rng.choice(networks))
            destinations.append(Address(str(net.network_address + rng.randrange(
                net.num_addresses)), 443))
        else:  # any IPv4 address
            destinations.append(Address(str(ipaddress.IPv4Address(rng.getrandbits(32))), 443))
    return rules, destinations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with TemporaryDirectory() as tmp:
        rules, destinations = build(args.rules, rng, Path(tmp))
    decide = rules.decide
    rounds = max(1, args.decisions // len(destinations))
    best = float("inf")
    for _ in range(3):  # the best of three: other load on the machine only adds
        started = time.perf_counter()
        for _ in range(rounds):
            for dest in destinations:
                decide(dest)
        best = min(best, time.perf_counter() - started)
    per_decision_us = best / (rounds * len(destinations)) * 1e6
    print(f"rules: {args.rules} ({args.rules // 2} domain suffixes, {args.rules - args.rules // 2}"
          f" CIDRs, {KEYWORDS} keywords, MATCH)")
    print(f"decision: {per_decision_us:.2f} us (best of 3 x {rounds * len(destinations)} "
          "decisions, mixed names and IPs)")


if __name__ == "__main__":
    main()
