"""Split routing: which way a destination goes (tunnel, direct or block), decided by rules.

Sans-IO: no sockets, no resolver, no clock. A :class:`RuleSet` is compiled once from
:class:`Rule` objects (the loaders in ``veil.client.rulefiles`` build them from files) and then
answers :meth:`RuleSet.decide` for every new stream or datagram destination.

Semantics, the same whatever file format a rule came from:

* Rules are tried in order; the first whose condition matches decides. No rule matching
  means :attr:`Action.TUNNEL` (the safe default: nothing leaks by omission).
* A rule holds one or more :class:`Condition`; any of them matching is the rule matching
  (a ``RULE-SET`` is one rule with the set's conditions).
* Inside a condition, the address tests (domain, suffix, keyword, regex, CIDR, country) are
  alternatives, and the port tests and the network test must hold as well; an empty group
  holds for everything. ``Condition()`` matches everything (``MATCH``).
* A destination given by name is never resolved here: IP and country tests do not match it.
  :meth:`RuleSet.address_may_decide` tells the caller when the name's addresses could still
  decide (no domain test decided it, and an IP or country test comes before the rule that
  did); the caller may then resolve it (through the tunnel: veil.client.routing) and
  :meth:`RuleSet.decide` for the address instead.
* Names compare case-insensitively with one trailing dot ignored; IDNA names are compared in
  the form given (``xn--`` labels match ``xn--`` rules). A suffix matches on label
  boundaries: ``example.com`` matches ``example.com`` and ``a.example.com``, never
  ``badexample.com``.
* Regex rules run on RE2 (google-re2), whose time is linear in the name's length whatever
  the pattern: the patterns come from files other people write (rule sets, a server's
  subscription), and Python's ``re`` backtracks exponentially on ``(a+)+$`` and its kind,
  which would freeze the client. RE2's syntax is Go's (sing-box's ``domain_regex`` is Go's
  regexp); look-around and back-references are refused at load, with ``file:line``.

Cost per decision is flat in the number of domain and CIDR rules: a dictionary probe per
label of the name, a bisect in a table of address ranges; keyword and regex rules are
scanned in order (keep them few).
"""

from __future__ import annotations

import bisect
import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from veil.errors import ConfigError
from veil.protocol.address import Address

__all__ = [
    "MAX_REGEX_CHARS",
    "NETWORKS",
    "PRIVATE_COUNTRY",
    "Action",
    "Condition",
    "CountryLookup",
    "CountryTable",
    "Decision",
    "Rule",
    "RuleSet",
    "compile_regex",
    "normalize_name",
]

NETWORKS = ("tcp", "udp")

#: The pseudo-country of private and special-use addresses (RFC 1918, loopback, link-local,
#: ULA, ...): ``GEOIP,PRIVATE`` / sing-box ``ip_is_private`` need no country data.
PRIVATE_COUNTRY = "PRIVATE"

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_NETWORK = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The longest regex a rule may have. A name is at most 253 characters and real patterns are a
#: few dozen; each compiled pattern holds memory in proportion to its length, and a rule set
#: from someone else's server must not make the client hold megabytes per rule.
MAX_REGEX_CHARS = 1024
#: RE2's memory budget per compiled pattern (its program and its DFA cache). RE2's default,
#: 8 MiB, is sized for searching any text; names are short, and hundreds of patterns at the
#: default could hold gigabytes. A pattern whose program does not fit is refused at load; a
#: search whose DFA would need more falls back to RE2's NFA (slower, still linear).
REGEX_MAX_MEM = 1 << 20


class _Pattern(Protocol):
    """What veil uses of a compiled RE2 pattern."""

    def search(self, text: str) -> object | None: ...


def compile_regex(pattern: str, origin: str = "") -> _Pattern:
    """``pattern`` compiled by RE2 (linear time in the name, see the module docstring);
    ConfigError naming ``origin`` (``file:line``) when it is too long or not RE2 syntax."""
    if len(pattern) > MAX_REGEX_CHARS:
        raise ConfigError(f"{origin}: regex of {len(pattern)} characters, over the "
                          f"{MAX_REGEX_CHARS} a rule may have")
    options = re2.Options()
    options.log_errors = False  # the ConfigError says it, with the line
    options.max_mem = REGEX_MAX_MEM
    try:
        return cast(_Pattern, re2.compile(pattern, options))
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        if isinstance(why, bytes):
            why = why.decode("utf-8", "replace")
        raise ConfigError(f"{origin}: bad regex {pattern!r}: {why} (RE2 syntax, as Go's and "
                          "sing-box's: no look-around, no back-references)") from exc


class Action(enum.Enum):
    """What to do with a destination."""

    TUNNEL = "tunnel"
    DIRECT = "direct"
    BLOCK = "block"


def normalize_name(name: str) -> str:
    """The form names are compared in: lower case, one trailing dot dropped."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


@dataclass(frozen=True, slots=True)
class Condition:
    """One set of tests; see the module docstring for how the groups combine."""

    domains: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    networks_ip: tuple[_NETWORK, ...] = ()
    countries: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    #: Inclusive (low, high) port ranges.
    port_ranges: tuple[tuple[int, int], ...] = ()
    #: ``tcp`` and/or ``udp``; empty means both.
    networks: tuple[str, ...] = ()
    #: Where it was written (``file:line``), for --explain and errors.
    origin: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(normalize_name(d) for d in self.domains))
        object.__setattr__(self, "suffixes",
                           tuple(normalize_name(s).lstrip(".") for s in self.suffixes))
        object.__setattr__(self, "keywords", tuple(k.lower() for k in self.keywords))
        object.__setattr__(self, "countries", tuple(c.upper() for c in self.countries))
        for low, high in self.port_ranges:
            if not 0 <= low <= high <= 65535:
                raise ConfigError(f"{self.origin}: bad port range {low}:{high}")
        for port in self.ports:
            if not 0 <= port <= 65535:
                raise ConfigError(f"{self.origin}: bad port {port}")
        for network in self.networks:
            if network not in NETWORKS:
                raise ConfigError(f"{self.origin}: network must be tcp or udp, not {network!r}")
        for pattern in self.regexes:
            compile_regex(pattern, self.origin)

    @property
    def has_address(self) -> bool:
        return bool(self.domains or self.suffixes or self.keywords or self.regexes
                    or self.networks_ip or self.countries)

    def describe(self) -> str:
        """The tests, in words close to the file formats (for --explain)."""
        parts: list[str] = []
        for label, values in (("domain", self.domains), ("domain_suffix", self.suffixes),
                              ("domain_keyword", self.keywords), ("domain_regex", self.regexes),
                              ("ip_cidr", tuple(str(n) for n in self.networks_ip)),
                              ("geoip", self.countries),
                              ("port", tuple(str(p) for p in self.ports)),
                              ("port_range", tuple(f"{a}:{b}" for a, b in self.port_ranges)),
                              ("network", self.networks)):
            if values:
                shown = ", ".join(values[:3]) + (f" (+{len(values) - 3})" if len(values) > 3
                                                 else "")
                parts.append(f"{label} {shown}")
        return " and ".join(parts) or "everything"


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of a rules file: conditions (any matching) and what to do then."""

    action: Action
    conditions: tuple[Condition, ...]
    #: ``file:line`` of the line.
    origin: str = ""
    #: The line as written, for --explain and the hit counters.
    text: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one destination."""

    action: Action
    #: The rule that decided, None when none matched (the default: tunnel).
    rule: Rule | None = None
    #: Which of its conditions matched.
    condition: Condition | None = None


class CountryLookup(Protocol):
    """Where an address is (ISO 3166 alpha-2, upper case), or None when unknown."""

    def country(self, ip: _IP) -> str | None: ...


@dataclass(slots=True)
class _Ranges:
    """Disjoint integer ranges, sorted, each with a value: a bisect finds an address's."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # inclusive

    def find(self, value: int) -> int:
        """The index of the range holding ``value``, or -1."""
        index = bisect.bisect_right(self.starts, value) - 1
        if index >= 0 and value <= self.ends[index]:
            return index
        return -1


class CountryTable:
    """A :class:`CountryLookup` from (CIDR, country) pairs: sorted ranges and a bisect.

    Overlapping networks are resolved in favour of the more specific one. Built once (cost
    O(n log n)); a lookup is one bisect.
    """

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        by_family: dict[int, list[tuple[int, int, int, str]]] = {4: [], 6: []}
        for cidr, country in entries:
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"country table: bad network {cidr!r}") from exc
            by_family[net.version].append((int(net.network_address),
                                           int(net.broadcast_address), -net.prefixlen,
                                           country.upper()))
        self._tables = {version: _flatten_countries(items) for version, items in
                        by_family.items()}

    def country(self, ip: _IP) -> str | None:
        ranges, values = self._tables[ip.version]
        index = ranges.find(int(ip))
        return values[index] if index >= 0 else None


def _flatten_countries(items: list[tuple[int, int, int, str]]) -> tuple[_Ranges, list[str]]:
    """Disjoint ranges from possibly nested ones, the most specific (longest prefix) winning."""
    segments = _segments([(start, end) for start, end, _, _ in items])
    ranges = _Ranges()
    values: list[str] = []
    best: list[tuple[int, str] | None] = [None] * len(segments.starts)
    for start, end, neg_prefix, country in items:
        first = bisect.bisect_left(segments.starts, start)
        index = first
        while index < len(segments.starts) and segments.starts[index] <= end:
            current = best[index]
            if current is None or -neg_prefix > current[0]:
                best[index] = (-neg_prefix, country)
            index += 1
    for index, chosen in enumerate(best):
        if chosen is None:
            continue
        start, end = segments.starts[index], segments.ends[index]
        if values and values[-1] == chosen[1] and ranges.ends[-1] + 1 == start:
            ranges.ends[-1] = end  # merge neighbours of the same country
            continue
        ranges.starts.append(start)
        ranges.ends.append(end)
        values.append(chosen[1])
    return ranges, values


def _segments(spans: list[tuple[int, int]]) -> _Ranges:
    """The elementary pieces ``spans`` (inclusive) cut the number line into, covered ones
    only."""
    points = sorted({start for start, _ in spans} | {end + 1 for _, end in spans})
    covered = _Ranges()
    if not points:
        return covered
    # A piece [points[i], points[i+1]-1] is covered when some span contains it; marking by a
    # difference array keeps this O(n log n) however deeply the spans nest.
    depth = [0] * (len(points) + 1)
    for start, end in spans:
        depth[bisect.bisect_left(points, start)] += 1
        depth[bisect.bisect_left(points, end + 1)] -= 1
    running = 0
    for index in range(len(points) - 1):
        running += depth[index]
        if running > 0:
            covered.starts.append(points[index])
            covered.ends.append(points[index + 1] - 1)
    return covered


def _is_private(ip: _IP) -> bool:
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast


class RuleSet:
    """Compiled rules: :meth:`decide` gives the first match's action, and counts hits.

    ``countries`` answers ``GEOIP`` tests; a rule set with a country test (other than
    ``PRIVATE``) and no ``countries`` is refused with a ConfigError, since it would silently
    never match.
    """

    def __init__(self, rules: Sequence[Rule], countries: CountryLookup | None = None) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._countries = countries
        #: Hits per rule (same order as :attr:`rules`); ``default_hits``: no rule matched.
        self.hits = [0] * len(self.rules)
        self.default_hits = 0
        conditions: list[Condition] = []
        owner: list[int] = []
        for rule_index, rule in enumerate(self.rules):
            for condition in rule.conditions:
                conditions.append(condition)
                owner.append(rule_index)
        self._conditions = conditions
        self._owner = owner
        self._full: dict[str, list[int]] = {}
        self._suffix: dict[str, list[int]] = {}
        self._keywords: list[tuple[int, str]] = []
        self._regexes: list[tuple[int, _Pattern]] = []
        self._country: dict[str, list[int]] = {}
        self._generic: list[int] = []  # conditions with no address test
        #: Conditions with an IP or country test, ascending: what a name's addresses can match.
        self._by_address: list[int] = []
        #: Conditions with port/network tests (others hold for any port and network).
        self._narrow: set[int] = set()
        spans: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        for index, condition in enumerate(conditions):
            if condition.ports or condition.port_ranges or condition.networks:
                self._narrow.add(index)
            if not condition.has_address:
                self._generic.append(index)
            if condition.networks_ip or condition.countries:
                self._by_address.append(index)
            for name in condition.domains:
                self._full.setdefault(name, []).append(index)
            for name in condition.suffixes:
                self._suffix.setdefault(name, []).append(index)
            self._keywords += [(index, keyword) for keyword in condition.keywords]
            self._regexes += [(index, compile_regex(pattern, condition.origin))
                              for pattern in condition.regexes]
            for country in condition.countries:
                if country != PRIVATE_COUNTRY and countries is None:
                    raise ConfigError(f"{condition.origin}: GEOIP {country} needs country "
                                      "data, and none is loaded")
                self._country.setdefault(country, []).append(index)
            for net in condition.networks_ip:
                spans[net.version].append((int(net.network_address),
                                           int(net.broadcast_address), index))
        self._cidr = {version: _index_spans(items) for version, items in spans.items()}

    def __len__(self) -> int:
        return len(self.rules)

    def decide(self, dest: Address, network: str = "tcp", *, count: bool = True) -> Decision:
        """The action for a new stream (``tcp``) or datagram (``udp``) to ``dest``."""
        index = self._first(dest, network)
        if index < 0:
            if count:
                self.default_hits += 1
            return Decision(Action.TUNNEL)
        rule_index = self._owner[index]
        if count:
            self.hits[rule_index] += 1
        rule = self.rules[rule_index]
        return Decision(rule.action, rule, self._conditions[index])

    def address_may_decide(self, dest: Address, network: str = "tcp") -> bool:
        """Whether ``dest``'s addresses could decide where the name alone does not.

        True when ``dest`` is a name, no domain test (full, suffix, keyword, regex) decides
        it, and a condition with an IP or country test whose port and network tests hold
        comes before the rule that does decide (or there is none): resolving the name and
        deciding for its address may then give another action, and that decision equals the
        name's whenever the address matches no such condition. A name a domain rule decides
        (``DIRECT``, ``TUNNEL`` or ``BLOCK``) is never resolved to test address rules.
        """
        if _ip_of(dest.host) is not None or not self._by_address:
            return False
        index = self._first(dest, network)
        if index >= 0 and self._conditions[index].has_address:
            return False  # a domain test decided it (a name passes no IP or country test)
        limit = index if index >= 0 else len(self._conditions)
        for candidate in self._by_address:
            if candidate >= limit:
                return False
            if self._holds(candidate, dest.port, network):
                return True
        return False

    def address_rules(self, dest: Address, network: str = "tcp") -> list[Rule]:
        """The rules whose IP or country tests could decide ``dest`` once resolved (those
        :meth:`address_may_decide` looks for), in order; for --explain."""
        if not self.address_may_decide(dest, network):
            return []
        index = self._first(dest, network)
        limit = index if index >= 0 else len(self._conditions)
        found: list[Rule] = []
        for candidate in self._by_address:
            if candidate >= limit:
                break
            rule = self.rules[self._owner[candidate]]
            if self._holds(candidate, dest.port, network) and all(r is not rule for r in found):
                found.append(rule)
        return found

    def _first(self, dest: Address, network: str) -> int:
        port = dest.port
        best = len(self._conditions)
        for index in self._generic:
            if index >= best:
                break
            if self._holds(index, port, network):
                best = index
                break
        ip = _ip_of(dest.host)
        if ip is None:
            name = normalize_name(dest.host)
            best = self._best(self._full.get(name), best, port, network)
            label = name
            while True:
                best = self._best(self._suffix.get(label), best, port, network)
                dot = label.find(".")
                if dot < 0:
                    break
                label = label[dot + 1:]
            for index, keyword in self._keywords:
                if index >= best:
                    break
                if keyword in name and self._holds(index, port, network):
                    best = index
            for index, pattern in self._regexes:
                if index >= best:
                    break
                if pattern.search(name) is not None and self._holds(index, port, network):
                    best = index
        else:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            ranges, hits = self._cidr[ip.version]
            found = ranges.find(int(ip))
            if found >= 0:
                best = self._best(hits[found], best, port, network)
            if self._country:
                if _is_private(ip):
                    best = self._best(self._country.get(PRIVATE_COUNTRY), best, port, network)
                if self._countries is not None:
                    country = self._countries.country(ip)
                    if country is not None:
                        best = self._best(self._country.get(country), best, port, network)
        return best if best < len(self._conditions) else -1

    def _best(self, candidates: Sequence[int] | None, best: int, port: int,
              network: str) -> int:
        """The least of ``best`` and the first of ``candidates`` (ascending) that holds."""
        if candidates is None:
            return best
        for index in candidates:
            if index >= best:
                return best
            if self._holds(index, port, network):
                return index
        return best

    def _holds(self, index: int, port: int, network: str) -> bool:
        if index not in self._narrow:
            return True
        condition = self._conditions[index]
        if condition.networks and network not in condition.networks:
            return False
        if not condition.ports and not condition.port_ranges:
            return True
        return port in condition.ports or any(low <= port <= high
                                              for low, high in condition.port_ranges)

    def explain(self, dest: Address, network: str = "tcp") -> str:
        """Which rule decides for ``dest`` and why, in one line (counts nothing)."""
        decision = self.decide(dest, network, count=False)
        by_address = self.address_rules(dest, network)
        if by_address:
            otherwise = ("tunnel (no rule matches: the default)" if decision.rule is None
                         else f"{decision.action.value} ({decision.rule.origin} "
                         f"{decision.rule.text})")
            shown = "; ".join(f"{rule.origin} {rule.text}" for rule in by_address[:3])
            if len(by_address) > 3:
                shown += f"; +{len(by_address) - 3} more"
            return (f"{dest} -> decided after the server resolves it (no domain rule "
                    f"matches): its address is matched by {shown} (direct: connected to that "
                    f"address from here; this host's resolver never sees the name), else "
                    f"{otherwise}; no answer: tunnel")
        if decision.rule is None:
            return (f"{dest} -> tunnel: no rule matches (the default; a name is resolved by "
                    "the server)")
        condition = decision.condition
        assert condition is not None
        where = condition.origin or decision.rule.origin
        why = _why(condition, dest)
        how = decision.action.value
        if decision.action is Action.DIRECT and dest.ip is None:
            how += " (resolved by this host's resolver)"
        elif decision.action is Action.TUNNEL and dest.ip is None:
            how += " (resolved by the server)"
        if where != decision.rule.origin:
            why = f"{where}: {why}"
        return f"{dest} -> {how}: {decision.rule.origin} {decision.rule.text} ({why})"

    def counters(self) -> list[str]:
        """One line per rule with its hits, then the default's (logged at exit)."""
        lines = [f"{rule.origin} {rule.text}: {hits} hit{'s' if hits != 1 else ''}"
                 for rule, hits in zip(self.rules, self.hits, strict=True)]
        lines.append(f"(no rule matched: tunnel): {self.default_hits} "
                     f"hit{'s' if self.default_hits != 1 else ''}")
        return lines


def _ip_of(host: str) -> _IP | None:
    """``host`` as an address, or None for a name. Half the cost of a decision was
    ``ip_address`` failing on names: a name's last label is not all digits (RFC 3696 2), and
    only IPv6 has colons, so most names skip the parse."""
    if ":" not in host and not host[-1:].isdigit():
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _index_spans(items: list[tuple[int, int, int]]) -> tuple[_Ranges, list[tuple[int, ...]]]:
    """Disjoint ranges, each with the conditions (ascending) whose networks cover it."""
    segments = _segments([(start, end) for start, end, _ in items])
    covering: list[list[int]] = [[] for _ in segments.starts]
    for start, end, index in items:
        position = bisect.bisect_left(segments.starts, start)
        while position < len(segments.starts) and segments.starts[position] <= end:
            covering[position].append(index)
            position += 1
    ranges = _Ranges()
    hits: list[tuple[int, ...]] = []
    for position, indices in enumerate(covering):
        value = tuple(sorted(set(indices)))
        start, end = segments.starts[position], segments.ends[position]
        if hits and hits[-1] == value and ranges.ends[-1] + 1 == start:
            ranges.ends[-1] = end
            continue
        ranges.starts.append(start)
        ranges.ends.append(end)
        hits.append(value)
    return ranges, hits


def _why(condition: Condition, dest: Address) -> str:
    """The test of ``condition`` that ``dest`` passes, in words."""
    extra = []
    if condition.ports or condition.port_ranges:
        extra.append(f"port {dest.port}")
    if condition.networks:
        extra.append("network " + "/".join(condition.networks))
    tail = (" and " + " and ".join(extra)) if extra else ""
    ip = dest.ip
    if ip is None:
        name = normalize_name(dest.host)
        if name in condition.domains:
            return f"domain {name}{tail}"
        for suffix in condition.suffixes:
            if name == suffix or name.endswith("." + suffix):
                return f"domain_suffix {suffix}{tail}"
        for keyword in condition.keywords:
            if keyword in name:
                return f"domain_keyword {keyword}{tail}"
        for pattern in condition.regexes:
            if compile_regex(pattern).search(name) is not None:
                return f"domain_regex {pattern}{tail}"
    else:
        for net in condition.networks_ip:
            if ip.version == net.version and ip in net:
                return f"ip_cidr {net}{tail}"
        if condition.countries:
            return f"geoip {'/'.join(condition.countries)}{tail}"
    if not condition.has_address:
        return (condition.describe() if tail else "matches everything")
    return condition.describe()
