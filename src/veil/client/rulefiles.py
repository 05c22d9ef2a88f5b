"""Rules from files: veil's rules file, sing-box rule-set source JSON, Clash classical lists.

veil's rules file (``veil connect --rules FILE``) is Clash-style, one rule a line::

    # comments and blank lines are skipped
    DOMAIN-SUFFIX,bank.example.cn,DIRECT
    DOMAIN-KEYWORD,ads,BLOCK
    IP-CIDR,10.0.0.0/8,DIRECT,no-resolve
    GEOIP,CN,DIRECT
    NETWORK,UDP,BLOCK              # every datagram
    QUIC,BLOCK                     # UDP to port 443 only: browsers fall back to TCP
    RULE-SET,lists/cn.json,DIRECT  # a sing-box source rule set or a Clash list, path
                                   # relative to this file
    MATCH,TUNNEL

Actions: ``TUNNEL`` (or ``PROXY``), ``DIRECT``, ``BLOCK`` (or ``REJECT``). Rule sets carry no
action: they are pulled in by a ``RULE-SET`` line, which gives theirs. Binary rule sets
(sing-box ``.srs``, mihomo ``.mrs``) are refused: no maintained Python reader exists, and
both tools write the source form (``sing-box rule-set decompile``).

Every bad line is a :class:`ConfigError` naming ``file:line`` and why. Nothing here does I/O
beyond reading the named files; matching is :mod:`veil.client.rules`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from veil.client import ruledata
from veil.client.rules import (
    PRIVATE_COUNTRY,
    Action,
    Condition,
    CountryLookup,
    Rule,
    RuleSet,
)
from veil.errors import ConfigError

__all__ = [
    "BINARY_SUFFIXES",
    "CN_DATA",
    "MAX_RULE_FILE_BYTES",
    "PRIVATE_NETWORKS",
    "QUIC_PORT",
    "CnData",
    "cn_preset",
    "load_clash_list",
    "load_rule_set_file",
    "load_rules",
    "load_singbox_source",
    "parse_rules_file",
]

#: A rules file or rule set larger than this is refused before it is read. The largest lists
#: people use (all of China's domains, ~120k lines) are a few MB; 64 MB leaves room while
#: keeping a wrong path (a disk image, a log) from filling memory.
MAX_RULE_FILE_BYTES = 64 * 1024 * 1024

#: RULE-SET lines one rules file may have. Each reads and holds a whole rule set (rule sets do
#: not nest); real configurations name a handful, so more than this is a mistake.
MAX_RULE_SET_REFERENCES = 256

BINARY_SUFFIXES = (".srs", ".mrs")

#: Kept out of the tunnel by the ``cn`` preset (defined with its data, which the app exports
#: share: veil.client.ruledata).
PRIVATE_NETWORKS = ruledata.PRIVATE_NETWORKS

_ACTIONS = {"TUNNEL": Action.TUNNEL, "PROXY": Action.TUNNEL, "DIRECT": Action.DIRECT,
            "BLOCK": Action.BLOCK, "REJECT": Action.BLOCK}

#: ``cn_data()``: the China preset's (domain suffixes, CIDR networks), see :func:`cn_preset`.
CnData = Callable[[], tuple[Iterable[str], Iterable[str]]]


def packaged_cn_data() -> tuple[list[str], list[str]]:
    """The China rule data packaged with veil (veil.client.ruledata, docs/routing.md)."""
    return ruledata.cn_domains(), ruledata.cn_networks()


#: Where ``--rules cn`` gets its data: the packaged lists (a caller may pass its own
#: ``cn_data`` to :func:`load_rules`, e.g. newer data from a subscription).
CN_DATA: CnData | None = packaged_cn_data


def _read_text(path: Path, origin: str) -> str:
    if path.suffix.lower() in BINARY_SUFFIXES:
        raise ConfigError(f"{origin}: {path} is a binary rule set ({path.suffix}); veil reads "
                          "the source form only (no maintained Python reader exists): use "
                          "the .json source (`sing-box rule-set decompile`) or a text list")
    try:
        size = path.stat().st_size
        if size > MAX_RULE_FILE_BYTES:
            raise ConfigError(f"{origin}: {path} is {size} bytes, over the "
                              f"{MAX_RULE_FILE_BYTES} a rules file may have")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: {path} is not UTF-8 text") from exc


# -- one condition per Clash line --------------------------------------------------------------

def _network(value: str, origin: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {value!r} is not an IP network (CIDR)") from exc


def _port_spec(value: str, origin: str, separator: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``443``, ``1000-2000`` (Clash) or ``1000:2000`` (sing-box), several joined by ``/``."""
    ports: list[int] = []
    ranges: list[tuple[int, int]] = []
    for raw_part in value.split("/"):
        part = raw_part.strip()
        try:
            if separator in part:
                low_text, high_text = part.split(separator, 1)
                low = int(low_text) if low_text else 0
                high = int(high_text) if high_text else 65535
                if not 0 <= low <= high <= 65535:
                    raise ValueError(part)
                ranges.append((low, high))
            else:
                port = int(part)
                if not 0 <= port <= 65535:
                    raise ValueError(part)
                ports.append(port)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {part!r} is not a port or port range") from exc
    return ports, ranges


def _clash_condition(kind: str, value: str, origin: str) -> Condition:
    kind = kind.strip().upper()
    value = value.strip()
    if not value and kind != "MATCH":
        raise ConfigError(f"{origin}: {kind} needs a value")
    if kind == "DOMAIN":
        return Condition(domains=(value,), origin=origin)
    if kind == "DOMAIN-SUFFIX":
        return Condition(suffixes=(value,), origin=origin)
    if kind == "DOMAIN-KEYWORD":
        return Condition(keywords=(value,), origin=origin)
    if kind == "DOMAIN-REGEX":
        return Condition(regexes=(value,), origin=origin)
    if kind in ("IP-CIDR", "IP-CIDR6"):
        return Condition(networks_ip=(_network(value, origin),), origin=origin)
    if kind == "GEOIP":
        country = value.upper()
        if country == "LAN":
            country = PRIVATE_COUNTRY
        if not (country == PRIVATE_COUNTRY or (len(country) == 2 and country.isalpha())):
            raise ConfigError(f"{origin}: GEOIP takes a two-letter country code or PRIVATE, "
                              f"not {value!r}")
        return Condition(countries=(country,), origin=origin)
    if kind == "DST-PORT":
        ports, ranges = _port_spec(value, origin, "-")
        return Condition(ports=tuple(ports), port_ranges=tuple(ranges), origin=origin)
    if kind == "NETWORK":
        network = value.lower()
        if network not in ("tcp", "udp"):
            raise ConfigError(f"{origin}: NETWORK takes TCP or UDP, not {value!r}")
        return Condition(networks=(network,), origin=origin)
    if kind == "MATCH":
        return Condition(origin=origin)
    raise ConfigError(f"{origin}: rule type {kind!r} is not supported (veil knows DOMAIN, "
                      "DOMAIN-SUFFIX, DOMAIN-KEYWORD, DOMAIN-REGEX, IP-CIDR, IP-CIDR6, GEOIP, "
                      "DST-PORT, NETWORK, MATCH, RULE-SET, and QUIC in a rules file)")


def _split_options(fields: list[str], origin: str) -> list[str]:
    """Drop the trailing ``no-resolve`` option: veil never resolves a name to test an IP rule,
    so every IP rule already behaves as no-resolve."""
    if len(fields) > 1 and fields[-1].strip().lower() == "no-resolve":
        return fields[:-1]
    return fields


def _lines(text: str) -> Iterable[tuple[int, str]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", "//", ";")):
            continue
        yield number, line


def load_clash_list(path: Path, origin: str = "") -> list[Condition]:
    """A Clash classical rule list (``TYPE,VALUE`` a line, or a YAML ``payload:`` list of
    them); one condition a line. ``origin``: the line that named the file, for a read
    error."""
    text = _read_text(path, origin or str(path))
    conditions: list[Condition] = []
    in_payload = False
    for number, raw_line in _lines(text):
        origin = f"{path}:{number}"
        line = raw_line
        if line.rstrip() == "payload:":
            in_payload = True
            continue
        if in_payload:
            if not line.startswith("-"):
                raise ConfigError(f"{origin}: expected a '- TYPE,VALUE' item under payload:")
            line = line[1:].strip()
            if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
                line = line[1:-1]
        elif line.startswith("-"):
            raise ConfigError(f"{origin}: a YAML list item outside a payload: list")
        fields = _split_options(line.split(","), origin)
        if fields[0].strip().upper() == "MATCH":
            raise ConfigError(f"{origin}: MATCH does not belong in a rule set (it would match "
                              "everything); put it in the rules file")
        if len(fields) != 2:
            raise ConfigError(f"{origin}: expected TYPE,VALUE (a rule set carries no action), "
                              f"got {line!r}")
        conditions.append(_clash_condition(fields[0], fields[1], origin))
    return conditions


# -- sing-box rule-set source ------------------------------------------------------------------

_SINGBOX_VERSIONS = (1, 2, 3)
_SINGBOX_FIELDS = frozenset({"domain", "domain_suffix", "domain_keyword", "domain_regex",
                             "ip_cidr", "port", "port_range", "network", "invert", "type"})


def _strings(value: Any, origin: str, key: str) -> list[str]:
    values = [value] if isinstance(value, str | int) else value
    if not isinstance(values, list) or not all(isinstance(v, str | int) for v in values):
        raise ConfigError(f"{origin}: {key} must be a string or a list of strings")
    return [str(v) for v in values]


def load_singbox_source(path: Path, origin: str = "") -> list[Condition]:
    """A sing-box rule-set source file (version 1 to 3), one condition per headless rule.

    Logical rules and ``invert`` are refused (veil's conditions do not negate), as are fields
    that need what a proxy client does not know here (process names, source addresses, ...).
    ``origin``: the line that named the file, for a read error.
    """
    try:
        document = json.loads(_read_text(path, origin or str(path)))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: a sing-box rule set is a JSON object")
    version = document.get("version")
    if version not in _SINGBOX_VERSIONS:
        raise ConfigError(f"{path}: sing-box rule-set version {version!r} is not supported "
                          f"(veil reads versions {', '.join(map(str, _SINGBOX_VERSIONS))})")
    rules = document.get("rules")
    if not isinstance(rules, list):
        raise ConfigError(f"{path}: 'rules' must be a list")
    conditions = []
    for number, rule in enumerate(rules):
        origin = f"{path}:rules[{number}]"
        if not isinstance(rule, dict):
            raise ConfigError(f"{origin}: a rule is a JSON object")
        if rule.get("type", "default") != "default":
            raise ConfigError(f"{origin}: logical rules (type {rule.get('type')!r}) are not "
                              "supported: write them as separate rules")
        if rule.get("invert"):
            raise ConfigError(f"{origin}: invert is not supported")
        unknown = sorted(set(rule) - _SINGBOX_FIELDS)
        if unknown:
            raise ConfigError(f"{origin}: field(s) {', '.join(unknown)} not supported (veil "
                              "reads domain, domain_suffix, domain_keyword, domain_regex, "
                              "ip_cidr, port, port_range, network)")
        ports: list[int] = []
        ranges: list[tuple[int, int]] = []
        for text in _strings(rule.get("port", []), origin, "port"):
            more_ports, _ = _port_spec(text, origin, ":")
            ports += more_ports
        for text in _strings(rule.get("port_range", []), origin, "port_range"):
            if ":" not in text:
                raise ConfigError(f"{origin}: port_range {text!r} is not LOW:HIGH")
            _, more_ranges = _port_spec(text, origin, ":")
            ranges += more_ranges
        networks = [n.lower() for n in _strings(rule.get("network", []), origin, "network")]
        condition = Condition(
            domains=tuple(_strings(rule.get("domain", []), origin, "domain")),
            suffixes=tuple(_strings(rule.get("domain_suffix", []), origin, "domain_suffix")),
            keywords=tuple(_strings(rule.get("domain_keyword", []), origin, "domain_keyword")),
            regexes=tuple(_strings(rule.get("domain_regex", []), origin, "domain_regex")),
            networks_ip=tuple(_network(text, origin)
                              for text in _strings(rule.get("ip_cidr", []), origin, "ip_cidr")),
            ports=tuple(ports), port_ranges=tuple(ranges), networks=tuple(networks),
            origin=origin)
        if condition == Condition(origin=origin):
            raise ConfigError(f"{origin}: an empty rule would match everything")
        conditions.append(condition)
    return conditions


def load_rule_set_file(path: Path, origin: str = "") -> list[Condition]:
    """A rule set by its format: ``.json`` is sing-box source, anything else a Clash list."""
    if path.suffix.lower() in BINARY_SUFFIXES:
        _read_text(path, origin or str(path))  # raises the binary-format error
    if path.suffix.lower() == ".json":
        return load_singbox_source(path, origin)
    return load_clash_list(path, origin)


# -- veil's rules file ---------------------------------------------------------------------------

def _action(text: str, origin: str) -> Action:
    action = _ACTIONS.get(text.strip().upper())
    if action is None:
        raise ConfigError(f"{origin}: action {text.strip()!r} is not TUNNEL, DIRECT or BLOCK")
    return action


#: HTTP/3's port. QUIC on it is what a ``QUIC`` rule means: browsers try it first and fall back
#: to TCP when it is dropped, so blocking it helps where a firewall throttles UDP.
QUIC_PORT = 443

#: Rule types of veil's rules file that take no value: ``TYPE,ACTION``. ``QUIC`` is veil's
#: own (Clash needs ``AND,((NETWORK,UDP),(DST-PORT,443))`` for it, which veil does not read;
#: a sing-box rule set can say ``{"network": "udp", "port": 443}``).
_VALUELESS: dict[str, Callable[[str], Condition]] = {
    "MATCH": lambda origin: Condition(origin=origin),
    "QUIC": lambda origin: Condition(ports=(QUIC_PORT,), networks=("udp",), origin=origin),
}


def parse_rules_file(path: Path) -> list[Rule]:
    """veil's rules file (see the module docstring)."""
    if path.suffix.lower() in BINARY_SUFFIXES:
        _read_text(path, str(path))  # raises the binary-format error
    if path.suffix.lower() == ".json":
        raise ConfigError(f"{path}: this is a rule set, which carries no action; pull it in "
                          f"from a rules file with a line such as RULE-SET,{path},DIRECT")
    text = _read_text(path, str(path))
    rules: list[Rule] = []
    references = 0
    for number, raw_line in _lines(text):
        origin = f"{path}:{number}"
        line = raw_line.split(" #", 1)[0].strip()  # a comment after the rule
        fields = _split_options(line.split(","), origin)
        kind = fields[0].strip().upper()
        if kind in _VALUELESS:
            if len(fields) != 2:
                raise ConfigError(f"{origin}: expected {kind},ACTION, got {line!r}")
            condition = _VALUELESS[kind](origin)
            rules.append(Rule(_action(fields[1], origin), (condition,), origin, line))
            continue
        if len(fields) != 3:
            raise ConfigError(f"{origin}: expected TYPE,VALUE,ACTION, got {line!r}")
        action = _action(fields[2], origin)
        if kind == "RULE-SET":
            references += 1
            if references > MAX_RULE_SET_REFERENCES:
                raise ConfigError(f"{origin}: more than {MAX_RULE_SET_REFERENCES} RULE-SET "
                                  "lines")
            target = Path(fields[1].strip())
            if not target.is_absolute():
                target = path.parent / target
            conditions = load_rule_set_file(target, origin)
            if not conditions:
                raise ConfigError(f"{origin}: rule set {target} has no rules")
            rules.append(Rule(action, tuple(conditions), origin, line))
            continue
        rules.append(Rule(action, (_clash_condition(kind, fields[1], origin),), origin, line))
    return rules


def cn_preset(domains: Iterable[str], networks: Iterable[str]) -> list[Rule]:
    """The ``--rules cn`` preset from its data: names under ``domains`` (suffixes) direct,
    private ranges direct, addresses in ``networks`` (mainland China's CIDRs) direct, the
    rest through the tunnel (a name no list holds is resolved by the server)."""
    origin = "preset cn"
    domain_list = tuple(domains)
    network_list = tuple(_network(text, f"{origin} networks") for text in networks)
    if not domain_list or not network_list:
        raise ConfigError("--rules cn: the preset's data is empty (no domains or no networks)")
    return [
        Rule(Action.DIRECT, (Condition(networks_ip=tuple(_network(n, origin)
                                                         for n in PRIVATE_NETWORKS),
                                       origin=f"{origin} private"),),
             f"{origin}:1", "IP-CIDR,(private ranges),DIRECT"),
        Rule(Action.DIRECT, (Condition(suffixes=domain_list, origin=f"{origin} domains"),),
             f"{origin}:2", f"RULE-SET,(cn domains: {len(domain_list)}),DIRECT"),
        Rule(Action.DIRECT, (Condition(networks_ip=network_list,
                                       origin=f"{origin} networks"),),
             f"{origin}:3", f"RULE-SET,(cn networks: {len(network_list)}),DIRECT"),
        Rule(Action.TUNNEL, (Condition(origin=origin),), f"{origin}:4", "MATCH,TUNNEL"),
    ]


def load_rules(sources: Sequence[str], *, countries: CountryLookup | None = None,
               cn_data: CnData | None = None) -> RuleSet:
    """The rule set ``--rules`` names (in order): rules files, or ``cn`` for the preset
    (``cn_data`` supplies its data; without it ``cn`` is a ConfigError)."""
    rules: list[Rule] = []
    for source in sources:
        if source == "cn":
            if cn_data is None:
                raise ConfigError("--rules cn needs the China rule data (domain list and "
                                  "mainland networks, veil.client.ruledata), which this "
                                  "build does not have; give a rules file instead")
            domains, networks = cn_data()
            rules += cn_preset(domains, networks)
            continue
        rules += parse_rules_file(Path(source))
    return RuleSet(rules, countries)
