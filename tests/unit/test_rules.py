"""The split-routing matcher (veil.client.rules): properties against a naive reference."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from veil.client.rules import (
    Action,
    Condition,
    CountryTable,
    Rule,
    RuleSet,
    normalize_name,
)
from veil.errors import ConfigError
from veil.protocol.address import Address

# Labels with a letter: an all-digit name would be an IP address, not a name.
LABEL = st.text(alphabet="abcxyz0-", min_size=1, max_size=6).filter(
    lambda s: not s.startswith("-") and not s.endswith("-") and any(c.isalpha() for c in s))
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
ACTIONS = st.sampled_from(list(Action))


def rule(action: Action, **tests: object) -> Rule:
    return Rule(action, (Condition(**tests),), "t", str(tests))  # type: ignore[arg-type]


def decide(rules: list[Rule], host: str, port: int = 443, network: str = "tcp") -> Action:
    return RuleSet(rules).decide(Address(host, port), network).action


# -- a naive reference: every rule tested in order ------------------------------------------------

def reference(rules: list[Rule], host: str, port: int, network: str) -> Action:
    dest = Address(host, port)
    for candidate in rules:
        for c in candidate.conditions:
            if matches(c, dest, network):
                return candidate.action
    return Action.TUNNEL


def matches(c: Condition, dest: Address, network: str) -> bool:
    if c.networks and network not in c.networks:
        return False
    if (c.ports or c.port_ranges) and not (
            dest.port in c.ports or any(a <= dest.port <= b for a, b in c.port_ranges)):
        return False
    if not c.has_address:
        return True
    ip = dest.ip
    if ip is None:
        name = dest.host.lower().removesuffix(".")
        return (name in c.domains
                or any(name == s or name.endswith("." + s) for s in c.suffixes)
                or any(k in name for k in c.keywords)
                or any(re.search(p, name) for p in c.regexes))
    return any(ip.version == n.version and ip in n for n in c.networks_ip)


# -- properties ----------------------------------------------------------------------------------

@given(NAME, NAME)
def test_a_suffix_matches_itself_and_subdomains_only_on_label_boundaries(
        suffix: str, prefix: str) -> None:
    rules = [rule(Action.DIRECT, suffixes=(suffix,))]
    assert decide(rules, suffix) is Action.DIRECT
    assert decide(rules, f"{prefix}.{suffix}") is Action.DIRECT
    # Glued on without a dot: a different name (badexample.com is not example.com's).
    glued = prefix + suffix
    expected = Action.DIRECT if glued == suffix or glued.endswith("." + suffix) else (
        Action.TUNNEL)
    assert decide(rules, glued) is expected


def test_the_classic_boundary_case() -> None:
    rules = [rule(Action.DIRECT, suffixes=("example.com",))]
    assert decide(rules, "example.com") is Action.DIRECT
    assert decide(rules, "a.b.example.com") is Action.DIRECT
    assert decide(rules, "badexample.com") is Action.TUNNEL
    assert decide(rules, "example.com.evil.org") is Action.TUNNEL
    assert decide(rules, "com") is Action.TUNNEL


@given(NAME, st.booleans(), st.booleans())
def test_case_and_one_trailing_dot_do_not_matter(name: str, upper_rule: bool,
                                                  dot_rule: bool) -> None:
    written = (name.upper() if upper_rule else name) + ("." if dot_rule else "")
    for tests in ({"domains": (written,)}, {"suffixes": (written,)}):
        rules = [rule(Action.BLOCK, **tests)]
        assert decide(rules, name.upper()) is Action.BLOCK
        assert decide(rules, name + ".") is Action.BLOCK
        assert decide(rules, name.swapcase() + ".") is Action.BLOCK


def test_a_full_domain_does_not_match_subdomains() -> None:
    rules = [rule(Action.DIRECT, domains=("example.com",))]
    assert decide(rules, "EXAMPLE.com.") is Action.DIRECT
    assert decide(rules, "www.example.com") is Action.TUNNEL


IPV4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_cidr_edges_v4(base: int, prefix: int) -> None:
    net = ipaddress.IPv4Network((base, prefix), strict=False)
    rules = [rule(Action.DIRECT, networks_ip=(net,))]
    first, last = int(net.network_address), int(net.broadcast_address)
    assert decide(rules, str(ipaddress.IPv4Address(first))) is Action.DIRECT
    assert decide(rules, str(ipaddress.IPv4Address(last))) is Action.DIRECT
    if first > 0:
        assert decide(rules, str(ipaddress.IPv4Address(first - 1))) is Action.TUNNEL
    if last < 2**32 - 1:
        assert decide(rules, str(ipaddress.IPv4Address(last + 1))) is Action.TUNNEL


@given(st.integers(0, 2**128 - 1), st.integers(0, 128))
@example(0, 80)  # ::/80 ends at ::ffff:ffff:ffff, an IPv4-mapped address (found by hypothesis)
def test_cidr_edges_v6_and_no_cross_family_match(base: int, prefix: int) -> None:
    net = ipaddress.IPv6Network((base, prefix), strict=False)
    rules = [rule(Action.BLOCK, networks_ip=(net,))]
    first, last = int(net.network_address), int(net.broadcast_address)

    def unmapped(value: int) -> bool:
        # An IPv4-mapped address (::ffff:a.b.c.d) is tested as the IPv4 address it is (as
        # sing-box unmaps), so v6 rules do not see it: test_an_ipv4_mapped_v6_address_...
        return ipaddress.IPv6Address(value).ipv4_mapped is None

    if unmapped(first):
        assert decide(rules, str(ipaddress.IPv6Address(first))) is Action.BLOCK
    if unmapped(last):
        assert decide(rules, str(ipaddress.IPv6Address(last))) is Action.BLOCK
    if last < 2**128 - 1 and unmapped(last + 1):
        assert decide(rules, str(ipaddress.IPv6Address(last + 1))) is Action.TUNNEL
    if prefix > 0:  # ::/0 aside, a v4 address is never inside a v6 network
        assert decide(rules, "10.0.0.1") is Action.TUNNEL


def test_an_ipv4_mapped_v6_address_is_tested_as_ipv4() -> None:
    rules = [rule(Action.DIRECT, networks_ip=(ipaddress.ip_network("192.0.2.0/24"),))]
    assert decide(rules, "::ffff:192.0.2.9") is Action.DIRECT


def test_a_name_never_matches_an_ip_rule() -> None:
    rules = [rule(Action.DIRECT, networks_ip=(ipaddress.ip_network("0.0.0.0/0"),)),
             rule(Action.DIRECT, countries=("PRIVATE",))]
    assert decide(rules, "localhost") is Action.TUNNEL
    assert decide(rules, "127.0.0.1") is Action.DIRECT


CONDITION = st.one_of(
    st.builds(lambda s: Condition(suffixes=(s,)), NAME),
    st.builds(lambda s: Condition(domains=(s,)), NAME),
    st.builds(lambda s: Condition(keywords=(s,)), LABEL),
    st.builds(lambda n: Condition(networks_ip=(n,)),
              st.builds(lambda b, p: ipaddress.IPv4Network((b, p), strict=False),
                        st.integers(0, 2**32 - 1), st.integers(0, 32))),
    st.builds(lambda s, p: Condition(suffixes=(s,), ports=(p,)), NAME,
              st.sampled_from([53, 80, 443])),
    st.builds(lambda n: Condition(networks=(n,)), st.sampled_from(["tcp", "udp"])),
    st.builds(lambda lo: Condition(port_ranges=((lo, lo + 100),)), st.integers(0, 400)),
)


@settings(max_examples=300)
@given(st.lists(st.tuples(ACTIONS, st.lists(CONDITION, min_size=1, max_size=3)),
                min_size=1, max_size=12),
       st.lists(st.one_of(NAME, IPV4.map(str)), min_size=1, max_size=8),
       st.sampled_from([53, 80, 443, 8080]), st.sampled_from(["tcp", "udp"]))
def test_first_match_wins_like_a_linear_scan(
        spec: list[tuple[Action, list[Condition]]], hosts: list[str], port: int,
        network: str) -> None:
    rules = [Rule(action, tuple(conditions), f"t:{i}", "") for i, (action, conditions)
             in enumerate(spec)]
    compiled = RuleSet(rules)
    for host in hosts:
        assert compiled.decide(Address(host, port), network).action is reference(
            rules, host, port, network), host


def test_order_decides_between_overlapping_rules() -> None:
    wide = rule(Action.DIRECT, networks_ip=(ipaddress.ip_network("10.0.0.0/8"),))
    narrow = rule(Action.BLOCK, networks_ip=(ipaddress.ip_network("10.1.0.0/16"),))
    assert decide([wide, narrow], "10.1.2.3") is Action.DIRECT
    assert decide([narrow, wide], "10.1.2.3") is Action.BLOCK
    suffix = rule(Action.DIRECT, suffixes=("example.com",))
    full = rule(Action.BLOCK, domains=("ads.example.com",))
    assert decide([suffix, full], "ads.example.com") is Action.DIRECT
    assert decide([full, suffix], "ads.example.com") is Action.BLOCK


def test_port_and_network_narrow_a_condition() -> None:
    quic = rule(Action.BLOCK, networks=("udp",), ports=(443,))
    assert decide([quic], "example.com", 443, "udp") is Action.BLOCK
    assert decide([quic], "example.com", 443, "tcp") is Action.TUNNEL
    assert decide([quic], "example.com", 80, "udp") is Action.TUNNEL


def test_no_rule_means_tunnel_and_hits_are_counted() -> None:
    rules = RuleSet([rule(Action.DIRECT, suffixes=("cn",))])
    rules.decide(Address("a.cn", 1))
    rules.decide(Address("b.cn", 1))
    rules.decide(Address("a.org", 1))
    rules.decide(Address("c.cn", 1), count=False)
    assert rules.hits == [2] and rules.default_hits == 1
    assert rules.counters()[-1].endswith("1 hit")


def test_countries_through_a_lookup_table() -> None:
    table = CountryTable([("1.0.1.0/24", "cn"), ("1.0.0.0/16", "AU"), ("2400:da00::/32", "CN")])
    assert table.country(ipaddress.ip_address("1.0.1.7")) == "CN"  # the more specific wins
    assert table.country(ipaddress.ip_address("1.0.2.7")) == "AU"
    assert table.country(ipaddress.ip_address("1.1.0.0")) is None
    assert table.country(ipaddress.ip_address("2400:da00::1")) == "CN"
    rules = [rule(Action.DIRECT, countries=("CN",))]
    compiled = RuleSet(rules, table)
    assert compiled.decide(Address("1.0.1.7", 443)).action is Action.DIRECT
    assert compiled.decide(Address("1.0.2.7", 443)).action is Action.TUNNEL
    assert compiled.decide(Address("baidu.com", 443)).action is Action.TUNNEL


def test_a_country_rule_without_country_data_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs country data"):
        RuleSet([rule(Action.DIRECT, countries=("CN",))])
    # PRIVATE needs none.
    compiled = RuleSet([rule(Action.DIRECT, countries=("PRIVATE",))])
    assert compiled.decide(Address("192.168.1.1", 80)).action is Action.DIRECT
    assert compiled.decide(Address("8.8.8.8", 80)).action is Action.TUNNEL


def test_explain_names_the_rule_and_the_test() -> None:
    rules = RuleSet([Rule(Action.DIRECT, (Condition(suffixes=("example.com",),
                                                    origin="r.txt:3"),),
                          "r.txt:3", "DOMAIN-SUFFIX,example.com,DIRECT")])
    line = rules.explain(Address("www.Example.com", 443))
    assert "direct" in line and "r.txt:3" in line and "domain_suffix example.com" in line
    assert "resolved by this host" in line
    assert "no rule matches" in rules.explain(Address("other.org", 443))
    assert rules.hits == [0]  # explaining counts nothing


def test_normalize_name() -> None:
    assert normalize_name("WWW.Example.COM.") == "www.example.com"
    assert normalize_name("xn--fiqs8s.") == "xn--fiqs8s"


# -- address_may_decide: when resolving a name could change the decision --------------------------

def test_a_name_no_domain_rule_decides_may_be_decided_by_an_earlier_address_rule() -> None:
    rules = RuleSet([
        rule(Action.BLOCK, domains=("ads.test",)),
        rule(Action.DIRECT, suffixes=("home.test",)),
        rule(Action.DIRECT, networks_ip=(ipaddress.ip_network("1.0.1.0/24"),)),
        rule(Action.TUNNEL),
    ])
    assert rules.address_may_decide(Address("foreign.test", 443))
    # A domain rule decides, whatever its action: never resolved to test address rules.
    for name in ("ads.test", "a.home.test"):
        assert not rules.address_may_decide(Address(name, 443))
    # An address is not a name: decided as it is.
    assert not rules.address_may_decide(Address("1.0.1.7", 443))
    assert not rules.address_may_decide(Address("::1", 443))


def test_a_rule_before_every_address_rule_decides_alone() -> None:
    rules = RuleSet([
        rule(Action.DIRECT, ports=(22,)),
        rule(Action.DIRECT, countries=("PRIVATE",)),
        rule(Action.TUNNEL),
    ])
    assert not rules.address_may_decide(Address("git.test", 22))  # DST-PORT,22 decides first
    assert rules.address_may_decide(Address("git.test", 443))
    # An address rule that cannot hold for the port or network decides nothing.
    narrow = RuleSet([rule(Action.DIRECT, countries=("PRIVATE",), networks=("udp",)),
                      rule(Action.TUNNEL)])
    assert not narrow.address_may_decide(Address("a.test", 443), "tcp")
    assert narrow.address_may_decide(Address("a.test", 443), "udp")


def test_without_address_rules_nothing_is_resolved() -> None:
    rules = RuleSet([rule(Action.DIRECT, suffixes=("cn",)), rule(Action.TUNNEL)])
    assert not rules.address_may_decide(Address("example.com", 443))
    assert not RuleSet([]).address_may_decide(Address("example.com", 443))
    # Address rules after the one that decides (MATCH first) cannot change it either.
    late = RuleSet([rule(Action.TUNNEL), rule(Action.DIRECT, countries=("PRIVATE",))])
    assert not late.address_may_decide(Address("example.com", 443))


@settings(max_examples=200, deadline=None)
@given(name=NAME, ip=st.integers(0, 2**32 - 1), actions=st.lists(ACTIONS, min_size=4,
                                                                   max_size=4),
       order=st.permutations(range(4)))
def test_the_address_decides_exactly_when_address_may_decide_says_it_can(
        name: str, ip: int, actions: list[Action], order: list[int]) -> None:
    """Resolving is worth it only when it can matter: when address_may_decide is False,
    deciding by any address gives the name's own decision; when it is True and the name's
    decision is not a domain rule's, deciding by the address is what first-match-wins says
    for a rule list where the name "has" that address."""
    address = str(ipaddress.IPv4Address(ip))
    pool = [rule(actions[0], suffixes=(name.split(".")[-1],)),
            rule(actions[1], networks_ip=(ipaddress.ip_network(f"{address}/32"),)),
            rule(actions[2], ports=(443,)),
            rule(actions[3])]
    rules = RuleSet([pool[i] for i in order])
    by_name = rules.decide(Address(name, 443), count=False)
    by_address = rules.decide(Address(address, 443), count=False)
    if not rules.address_may_decide(Address(name, 443)):
        if by_name.rule is None or not by_name.rule.conditions[0].has_address:
            assert by_address.rule is by_name.rule
    else:
        assert by_name.rule is None or not by_name.rule.conditions[0].has_address
        assert by_address.rule is pool[1]  # the /32 comes before what decided the name


def test_explain_says_a_name_is_decided_after_the_server_resolves_it() -> None:
    rules = RuleSet([
        Rule(Action.DIRECT, (Condition(suffixes=("cn",)),), "r:1", "DOMAIN-SUFFIX,cn,DIRECT"),
        Rule(Action.DIRECT, (Condition(countries=("PRIVATE",)),), "r:2", "GEOIP,PRIVATE,DIRECT"),
        Rule(Action.TUNNEL, (Condition(),), "r:3", "MATCH,TUNNEL"),
    ])
    line = rules.explain(Address("www.example.top", 443))
    assert line.startswith("www.example.top:443 -> decided after the server resolves it")
    assert "r:2 GEOIP,PRIVATE,DIRECT" in line and "else tunnel (r:3 MATCH,TUNNEL)" in line
    assert "resolved by this host" not in line.split(";")[0]
    # A domain rule's decision is told as before.
    assert "direct (resolved by this host's resolver)" in rules.explain(Address("a.cn", 443))
