"""Split routing in TUN mode, the sans-IO parts: the route plan from rules (first match wins
across overlapping CIDRs), rules routes cannot apply, the DNS decision and answers, the bounded
table of DIRECT names' addresses, and the kill switch's sets."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import sys
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.client.rulefiles import cn_preset, load_rules
from veil.client.rules import Action, Condition, Rule, RuleSet
from veil.client.tun_dns import answer_addresses, answers, blocked_answer, query_name
from veil.client.tun_rules import (
    DirectHosts,
    PortBlock,
    TunRoutePlan,
    dns_action,
    plan_routes,
    split_port_blocks,
)
from veil.errors import ConfigError
from veil.protocol.address import Address


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def cidr_rule(action: Action, *cidrs: str) -> Rule:
    return Rule(action, (Condition(networks_ip=tuple(net(c) for c in cidrs)),),
                "rules.txt:1", f"IP-CIDR,{cidrs[0]},{action.value.upper()}")


def rules_from(tmp_path: Path, text: str) -> RuleSet:
    path = tmp_path / "rules.txt"
    path.write_text(text)
    return load_rules([str(path)])


def test_first_match_wins_across_nested_cidrs_unlike_longest_prefix() -> None:
    # The /8 is blocked first: its /16 is blocked too, although a longer prefix says DIRECT
    # (kernel routes alone would pick the /16).
    plan = plan_routes(RuleSet([cidr_rule(Action.BLOCK, "10.0.0.0/8"),
                                cidr_rule(Action.DIRECT, "10.1.0.0/16", "198.51.100.0/24")]))
    assert plan.block == (net("10.0.0.0/8"),)
    assert plan.direct == (net("198.51.100.0/24"),)


def test_a_tunnel_rule_carves_a_hole_out_of_a_later_direct_range() -> None:
    plan = plan_routes(RuleSet([cidr_rule(Action.TUNNEL, "192.0.2.128/25"),
                                cidr_rule(Action.DIRECT, "192.0.2.0/24", "2001:db8::/32")]))
    assert plan.direct == (net("192.0.2.0/25"), net("2001:db8::/32"))
    assert plan.block == ()


def test_loopback_link_local_and_multicast_are_never_routed_direct() -> None:
    plan = plan_routes(RuleSet([cidr_rule(Action.DIRECT, "0.0.0.0/0", "::/0")]))
    direct = set(plan.direct)
    for local in ("127.0.0.1", "169.254.1.1", "224.0.0.251", "::1", "fe80::1", "ff02::1"):
        ip = ipaddress.ip_address(local)
        assert not any(ip in n for n in direct if n.version == ip.version), local
    assert any(ipaddress.ip_address("8.8.8.8") in n for n in direct if n.version == 4)


def test_geoip_private_is_planned_from_pythons_own_private_ranges(tmp_path: Path) -> None:
    plan = plan_routes(rules_from(tmp_path, "GEOIP,PRIVATE,DIRECT\n"))
    for inside in ("10.1.2.3", "192.168.1.1", "172.20.0.1", "fd00::1"):
        ip = ipaddress.ip_address(inside)
        assert any(ip in n for n in plan.direct if n.version == ip.version), inside
    assert not any(ipaddress.ip_address("8.8.8.8") in n for n in plan.direct if n.version == 4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32),
                          st.sampled_from([Action.DIRECT, Action.BLOCK, Action.TUNNEL])),
                min_size=1, max_size=6),
       st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20))
def test_the_plan_agrees_with_decide_for_every_address(
        specs: list[tuple[int, int, Action]], probes: list[int]) -> None:
    rules = [cidr_rule(action, str(ipaddress.IPv4Network((base, prefix), strict=False)))
             for base, prefix, action in specs]
    rule_set = RuleSet(rules)
    plan = plan_routes(rule_set)
    edges = [int(n.network_address) for r in rules for c in r.conditions
             for n in c.networks_ip] + probes
    for value in edges:
        ip = ipaddress.IPv4Address(value)
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or value >> 24 == 0 or (
                value == 2**32 - 1):
            continue  # never routed, whatever the rules say
        expected = rule_set.decide(Address(str(ip), 0), count=False).action
        got = (Action.DIRECT if any(ip in n for n in plan.direct) else
               Action.BLOCK if any(ip in n for n in plan.block) else Action.TUNNEL)
        assert got is expected, ip


def test_the_cn_preset_plans_thousands_of_direct_ranges_quickly() -> None:
    import time

    from veil.client.rulefiles import packaged_cn_data

    domains, networks = packaged_cn_data()
    started = time.perf_counter()
    plan = plan_routes(RuleSet(cn_preset(domains, networks)))
    took = time.perf_counter() - started
    assert len(plan.direct) > 10000 and plan.block == ()
    assert any(ipaddress.ip_address("10.0.0.1") in n for n in plan.direct if n.version == 4)
    assert took < 10.0, took  # about 1 s on the development machine


@pytest.mark.parametrize("line", ["DST-PORT,443,DIRECT", "NETWORK,UDP,TUNNEL",
                                  "DOMAIN-SUFFIX,example.com,DIRECT\nMATCH,DIRECT",
                                  "MATCH,BLOCK"])
def test_rules_routes_cannot_apply_are_refused_with_their_line(tmp_path: Path,
                                                               line: str) -> None:
    with pytest.raises(ConfigError, match=r"rules\.txt:\d"):
        plan_routes(rules_from(tmp_path, line + "\n"))


def test_port_and_network_block_rules_become_the_kill_switchs_port_blocks(
        tmp_path: Path) -> None:
    """Before any rule that does not block, a port/network BLOCK rule is exact when applied
    to all traffic; the address plan is made of the rules after it, as if it were not there
    (a plan by ``decide(port 0, tcp)`` would have blocked everything under DST-PORT,0-1024)."""
    rules = rules_from(tmp_path, "IP-CIDR,192.0.2.0/24,BLOCK\nQUIC,BLOCK\n"
                                 "DST-PORT,6005-6020/22/6000-6010/0-1024,BLOCK\n"
                                 "IP-CIDR,198.51.100.0/24,DIRECT\nMATCH,TUNNEL\n")
    plan = plan_routes(rules)
    assert plan.block == (net("192.0.2.0/24"),)
    assert plan.direct == (net("198.51.100.0/24"),)
    assert [(b.networks, b.ports) for b in plan.port_blocks] == [
        (("udp",), ((443, 443),)), (("tcp", "udp"), ((0, 1024), (6000, 6020)))]
    assert plan.port_blocks[0].origin.endswith("rules.txt:2 QUIC,BLOCK")
    plan = plan_routes(rules_from(tmp_path, "NETWORK,UDP,BLOCK\n"))
    assert plan == TunRoutePlan(port_blocks=(
        PortBlock(("udp",), (), f"{tmp_path}/rules.txt:1 NETWORK,UDP,BLOCK"),))


def test_a_block_rule_sets_port_tests_are_port_blocks_and_its_names_still_blocked(
        tmp_path: Path) -> None:
    (tmp_path / "block.json").write_text(json.dumps({"version": 1, "rules": [
        {"network": "udp", "port": 443}, {"domain": ["ads.example"]},
        {"network": ["tcp"], "port_range": ["25:25"]}]}))
    rules = rules_from(tmp_path, "RULE-SET,block.json,BLOCK\nNETWORK,TCP,BLOCK\n"
                                 "DOMAIN-SUFFIX,example.cn,DIRECT\n")
    routed, blocks = split_port_blocks(rules)
    assert [(b.networks, b.ports) for b in blocks] == [
        (("udp",), ((443, 443),)), (("tcp",), ((25, 25),)), (("tcp",), ())]
    assert "block.json:rules[0]" in blocks[0].origin
    # A name is decided by what is left: NETWORK,TCP,BLOCK (the kill switch's) does not
    # make every query NXDOMAIN, the rule set's domain still blocks.
    assert dns_action(routed, "www.example.cn") is Action.DIRECT
    assert dns_action(routed, "ads.example") is Action.BLOCK
    assert dns_action(routed, "other.example") is Action.TUNNEL
    assert split_port_blocks(routed) == (routed, ())  # nothing left to take out: as is


@pytest.mark.parametrize(("text", "why"), [
    ("DOMAIN-SUFFIX,example.cn,DIRECT\nQUIC,BLOCK", "move this rule above"),
    ("IP-CIDR,10.0.0.0/8,TUNNEL\nDST-PORT,22,BLOCK", "move this rule above"),
    ("RULE-SET,mixed.json,BLOCK", "port or network"),
    ("DST-PORT,443,DIRECT", "port or network")])
def test_port_rules_the_kill_switch_cannot_apply_exactly_are_refused(
        tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "mixed.json").write_text(json.dumps({"version": 1, "rules": [
        {"domain": ["a.example"], "port": 443}]}))
    with pytest.raises(ConfigError, match=why):
        plan_routes(rules_from(tmp_path, text + "\n"))


def test_match_tunnel_and_name_rules_are_fine(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, "DOMAIN-SUFFIX,example.cn,DIRECT\nDOMAIN,ads.example,BLOCK\n"
                                 "MATCH,TUNNEL\n")
    assert plan_routes(rules) == TunRoutePlan()
    assert dns_action(rules, "www.example.cn.") is Action.DIRECT
    assert dns_action(rules, "ads.example") is Action.BLOCK
    assert dns_action(rules, "badexample.cn") is Action.TUNNEL
    assert dns_action(rules, "") is Action.TUNNEL


def test_a_query_name_that_is_no_host_name_never_goes_direct(tmp_path: Path) -> None:
    """As text (dnspython's escapes), a label holding a dot reads like two labels: never
    decided by a domain rule, so never sent to the domestic resolver."""
    rules = rules_from(tmp_path, "DOMAIN-SUFFIX,example.cn,DIRECT\n")
    for labels in ([b"a.example", b"cn"], [b"www", b"example\\", b"cn"],
                   [b"w\xc3\xa9b", b"example", b"cn"], [b"*", b"example", b"cn"]):
        name = dns.name.Name([*labels, b""]).to_text(omit_final_dot=True)
        assert dns_action(rules, name) is Action.TUNNEL, name
    for name in ("www.example.cn", "_dmarc.example.cn", "xn--fiqs8s.example.cn", "EXAMPLE.CN."):
        assert dns_action(rules, name) is Action.DIRECT, name


def test_an_upstream_answer_counts_only_for_its_own_query() -> None:
    query = dns.message.make_query("www.example.cn", "A")
    good = dns.message.make_response(query)
    assert answers(query, good.to_wire())
    good.question[0].name = dns.name.from_text("WWW.Example.CN")  # 0x20 case is the same name
    assert answers(query, good.to_wire())
    other_id = dns.message.make_response(query)
    other_id.id ^= 1
    other_type = dns.message.make_response(dns.message.make_query("www.example.cn", "AAAA"))
    other_type.id = query.id
    no_question = dns.message.make_response(query)
    no_question.question = []
    no_question.set_rcode(dns.rcode.SERVFAIL)
    for wrong in (other_id.to_wire(), other_type.to_wire(), no_question.to_wire(),
                  query.to_wire(), b"\x00\x01junk"):
        assert not answers(query, wrong)


def test_dns_messages() -> None:
    query = dns.message.make_query("www.Example.cn.", "A")
    parsed = query_name(query.to_wire())
    assert parsed is not None and parsed[1] == "www.Example.cn"
    assert query_name(b"\x00\x01garbage") is None
    blocked = dns.message.from_wire(blocked_answer(query))
    assert blocked.rcode() == dns.rcode.NXDOMAIN and blocked.id == query.id
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("www.example.cn.", 60, "IN", "CNAME",
                                               "cdn.example.cn."))
    response.answer.append(dns.rrset.from_text("cdn.example.cn.", 120, "IN", "A",
                                               "198.51.100.7", "198.51.100.8"))
    # Sorted: dnspython shuffles the records of a set when it writes them.
    assert sorted(answer_addresses(response.to_wire())) == [
        (ipaddress.ip_address("198.51.100.7"), 120), (ipaddress.ip_address("198.51.100.8"), 120)]
    assert query_name(response.to_wire()) is None  # an answer is not a query


def test_a_direct_answer_routes_only_its_own_names_addresses_and_few_of_them() -> None:
    """The domestic resolver is the censor's: records for another name, addresses no host is
    reached at, and more than MAX_DIRECT_ADDRESSES_PER_ANSWER never leave outside the tunnel."""
    from veil.client.tun_dns import MAX_DIRECT_ADDRESSES_PER_ANSWER

    query = dns.message.make_query("www.example.cn.", "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("www.example.cn.", 60, "IN", "CNAME",
                                               "cdn.example.cn."))
    response.answer.append(dns.rrset.from_text("cdn.example.cn.", 60, "IN", "A",
                                               "198.51.100.7", "127.0.0.1", "224.0.0.1"))
    # An address for a name nobody asked about (a foreign service's, say): not routed.
    response.answer.append(dns.rrset.from_text("telegram.org.", 60, "IN", "A", "149.154.167.99"))
    wire = response.to_wire()
    assert answer_addresses(wire, "www.example.cn") == [(ipaddress.ip_address("198.51.100.7"), 60)]
    many = dns.message.make_response(query)
    many.answer.append(dns.rrset.from_text("www.example.cn.", 60, "IN", "A",
                                           *(f"198.51.{i // 250}.{i % 250 + 1}"
                                             for i in range(4000))))
    assert len(answer_addresses(many.to_wire(), "www.example.cn")) == \
        MAX_DIRECT_ADDRESSES_PER_ANSWER


def test_direct_hosts_hold_within_bounds_and_stay_bounded() -> None:
    hosts = DirectHosts(limit=2, hold_min=100, hold_max=1000)
    a, b, c = (ipaddress.ip_address(f"198.51.100.{i}") for i in (1, 2, 3))
    assert hosts.add([(a, 5)], now=0) == ([a], [])  # held 100 s, not 5
    assert hosts.add([(b, 10**6)], now=0) == ([b], [])  # held 1000 s, not days
    assert hosts.add([(a, 500)], now=50) == ([], [])  # known: extended to 550, no new route
    assert hosts.until[a] == 550
    assert hosts.add([(c, 100)], now=60) == ([c], [a])  # full: the first to expire goes
    assert hosts.expire(now=159) == []
    assert hosts.expire(now=160) == [c]
    assert hosts.next_deadline() == 1000


@pytest.mark.skipif(sys.platform != "linux", reason="TUN mode is Linux only")
def test_killswitch_sets_put_direct_names_before_blocks_and_blocks_before_the_tunnel() -> None:
    from veil.client.tun import killswitch_ruleset, route_lines

    plan = TunRoutePlan(direct=(net("198.51.100.0/24"), net("2001:db8::/32")),
                        block=(net("192.0.2.0/24"),))
    text = killswitch_ruleset("veil0", [Address("10.0.2.2", 443)], [], plan=plan,
                              direct_resolvers=["10.0.11.1"])
    assert "set direct4 { type ipv4_addr; flags interval; elements = { 198.51.100.0/24 }; }" \
        in text
    assert "set block4 { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 }; }" in text
    assert "set dns_direct6 { type ipv6_addr; }" in text
    output = text.split("chain output")[1].split("chain forward")[0]
    order = [output.index(s) for s in ("@dns_direct4 accept", "@block4 reject",
                                       "@direct4 accept", 'oifname "veil0" accept')]
    assert order == sorted(order)
    # Only veil's own resolver's (marked) queries reach the domestic resolver.
    assert ("meta mark 0x7665696c ip daddr 10.0.11.1 meta l4proto { tcp, udp } th dport 53 "
            "accept") in output
    forward = text.split("chain forward")[1]
    assert forward.index("@block4 reject") < forward.index('oifname "veil0" accept')
    assert route_lines("add", [net("198.51.100.0/24")], ("10.0.11.1", "c0")) == [
        "route add 198.51.100.0/24 via 10.0.11.1 dev c0 proto 118"]
    assert route_lines("del", ["10.0.11.1/32"], (None, "c0")) == [
        "route del 10.0.11.1/32 dev c0 proto 118"]


@pytest.mark.skipif(sys.platform != "linux", reason="TUN mode is Linux only")
def test_port_blocks_come_after_veils_own_flows_and_before_every_way_out(
        tmp_path: Path) -> None:
    from veil.client.tun import TunClientOptions, killswitch_ruleset

    rules = rules_from(tmp_path, "QUIC,BLOCK\nNETWORK,TCP,BLOCK\n"
                                 "DOMAIN-SUFFIX,example.cn,DIRECT\n"
                                 "IP-CIDR,198.51.100.0/24,DIRECT\n")
    options = TunClientOptions.parse(["192.168.0.0/16"], rules)
    # The resolver decides names by the rules the kill switch does not apply.
    assert options.rules is not None and len(options.rules) == 2
    assert dns_action(options.rules, "www.example.cn") is Action.DIRECT
    text = killswitch_ruleset("veil0", [Address("10.0.2.2", 443)], options.exclude,
                              plan=options.plan, direct_resolvers=["10.0.11.1"])
    chain = text.split("chain port_blocks {")[1].split("}\n")[0]
    assert chain.split("\n")[1:4] == [
        "    meta mark 0x7665696c return",
        "    meta l4proto udp th dport { 443 } ct state new reject with icmpx type "
        "port-unreachable",
        "    meta l4proto tcp ct state new reject with tcp reset"]
    output = text.split("chain output")[1].split("chain forward")[0]
    # Loopback, the resolver's marked queries, the TLS to the server (TCP, here on 443),
    # DHCP and --exclude are let out before any rule could refuse them.
    order = [output.index(s) for s in (
        'oifname "lo" accept', "meta mark 0x7665696c ip daddr 10.0.11.1",
        "ip daddr 10.0.2.2 tcp dport 443 accept", "udp sport 68 udp dport 67 accept",
        "ip daddr 192.168.0.0/16 accept", "jump port_blocks", "@dns_direct4 accept",
        "@block4 reject", "@direct4 accept", 'oifname "veil0" accept')]
    assert order == sorted(order)
    assert output.count("jump port_blocks") == 1
    forward = text.split("chain forward")[1]
    # What containers send is refused alike, through the tunnel or direct.
    assert forward.index('oifname "veil0" jump port_blocks') < forward.index(
        'oifname "veil0" accept')
    for where in ("ip daddr @direct4", "ip daddr @dns_direct4", "ip6 daddr @direct6"):
        assert forward.index(f"{where} jump port_blocks") < forward.index(f"{where} accept")
    # Without port blocks: no chain, no jump.
    plain = killswitch_ruleset("veil0", [Address("10.0.2.2", 443)], [],
                               plan=TunRoutePlan(direct=(net("198.51.100.0/24"),)))
    assert "port_blocks" not in plain


class _Recorder:
    """Stands in for ``nft`` and ``ip -batch`` (the kernel is the netns tests' business): the
    runs, each with its input; ``fail_nft`` makes every nft run fail as a refused batch does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail_nft: bool = False) -> None:
        from veil.client import tun
        from veil.net.tun_linux import TunError

        self.nft: list[str] = []
        self.ip: list[list[str]] = []

        def nft(ruleset: str) -> None:
            self.nft.append(ruleset)
            if fail_nft:
                raise TunError("nft failed: Error: Could not process rule")

        def ip_batch(lines: list[str]) -> list[str]:
            self.ip.append(list(lines))
            return []

        monkeypatch.setattr(tun, "nft", nft)
        monkeypatch.setattr(tun, "ip_batch", ip_batch)


def _tun_client(tmp_path: Path) -> object:
    from veil.client.tun import TunClient, TunClientOptions
    from veil.protocol.accesskey import AccessKey

    client = TunClient(AccessKey(Address("veil.example", 8443), bytes(32), bytes(32)),
                       TunClientOptions(state_dir=tmp_path))
    client._original = {4: ("10.0.11.1", "c0"), 6: (None, "c0")}
    return client


ANSWERED = [(ipaddress.ip_address("198.51.100.7"), 60), (ipaddress.ip_address("198.51.100.8"), 60),
            (ipaddress.ip_address("2001:db8::7"), 60)]


@pytest.mark.skipif(sys.platform != "linux", reason="TUN mode is Linux only")
def test_one_answers_addresses_take_one_nft_run_and_one_sweeps_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    runs = _Recorder(monkeypatch)
    client = _tun_client(tmp_path)
    asyncio.run(client._route_direct_names(ANSWERED))  # type: ignore[attr-defined]
    assert runs.nft == ["add element inet veil-killswitch dns_direct4 { 198.51.100.7 }\n"
                        "add element inet veil-killswitch dns_direct4 { 198.51.100.8 }\n"
                        "add element inet veil-killswitch dns_direct6 { 2001:db8::7 }\n"]
    assert runs.ip == [["route add 198.51.100.7/32 via 10.0.11.1 dev c0 proto 118",
                        "route add 198.51.100.8/32 via 10.0.11.1 dev c0 proto 118",
                        "route add 2001:db8::7/128 dev c0 proto 118"]]
    runs.nft.clear()
    runs.ip.clear()
    gone = [ip for ip, _ in ANSWERED]
    client._unroute_direct_hosts(gone)  # type: ignore[attr-defined]
    # Routes go first; each element is added before it is deleted, so that one already
    # gone does not fail (and so undo) the whole batch.
    assert len(runs.ip) == 1 and len(runs.ip[0]) == 3 and runs.ip[0][0].startswith("route del")
    assert len(runs.nft) == 1
    assert runs.nft[0].splitlines()[:2] == [
        "add element inet veil-killswitch dns_direct4 { 198.51.100.7 }",
        "delete element inet veil-killswitch dns_direct4 { 198.51.100.7 }"]
    assert len(runs.nft[0].splitlines()) == 6


@pytest.mark.skipif(sys.platform != "linux", reason="TUN mode is Linux only")
def test_an_answer_the_kill_switch_refused_is_not_routed_nor_remembered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from veil.net.tun_linux import TunError

    runs = _Recorder(monkeypatch, fail_nft=True)
    client = _tun_client(tmp_path)
    with pytest.raises(TunError):  # the resolver logs it; the addresses stay in the tunnel
        asyncio.run(client._route_direct_names(ANSWERED))  # type: ignore[attr-defined]
    assert len(runs.nft) == 1 and runs.ip == []  # no route around a kill switch that refuses
    assert client.direct_hosts.until == {}  # type: ignore[attr-defined]


@pytest.mark.skipif(sys.platform != "linux", reason="TUN mode is Linux only")
def test_the_sweeper_outlives_a_failed_sweep_and_logs_a_run_of_them_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from veil.client import tun

    monkeypatch.setattr(tun, "DIRECT_SWEEP_S", 0.001)
    client = _tun_client(tmp_path)
    outcomes: list[Exception | None] = [RuntimeError("one"), RuntimeError("two"), None,
                                        RuntimeError("three"), None]
    sweeps: list[float] = []

    async def run() -> None:
        done = asyncio.Event()

        def expire(now: float) -> list[object]:
            sweeps.append(now)
            outcome = outcomes[len(sweeps) - 1] if len(sweeps) <= len(outcomes) else None
            if len(sweeps) == len(outcomes):
                done.set()
            if outcome is not None:
                raise outcome
            return []

        class FlakyHosts:  # DirectHosts whose sweeps fail as ``outcomes`` say
            pass

        hosts = FlakyHosts()
        hosts.expire = expire  # type: ignore[attr-defined]
        client.direct_hosts = hosts  # type: ignore[attr-defined]
        sweeper = asyncio.ensure_future(client._sweep_direct_names())  # type: ignore[attr-defined]
        try:
            await asyncio.wait_for(done.wait(), 10)
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    with caplog.at_level(logging.WARNING, logger="veil.client"):
        asyncio.run(run())
    warnings = [r for r in caplog.records if "sweep" in r.getMessage()]
    # Two runs of failures (one, two; three): two lines, each with its exception.
    assert [str(r.exc_info[1]) for r in warnings if r.exc_info] == ["one", "three"]
    assert len(warnings) == 2
