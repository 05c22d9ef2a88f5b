"""Rules from files (veil.client.rulefiles): veil's rules file, sing-box source, Clash lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.client.rulefiles import (
    cn_preset,
    load_clash_list,
    load_rules,
    load_singbox_source,
    parse_rules_file,
)
from veil.client.rules import Action, RuleSet
from veil.errors import ConfigError
from veil.protocol.address import Address


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def action(rules: RuleSet, host: str, port: int = 443, network: str = "tcp") -> Action:
    return rules.decide(Address(host, port), network).action


def test_a_rules_file_with_every_type(tmp_path: Path) -> None:
    write(tmp_path / "set.json", json.dumps({"version": 3, "rules": [
        {"domain_suffix": ["cn", ".example.net"], "port": [443, "8443"]},
        {"ip_cidr": ["1.0.1.0/24", "2400:da00::/32"]},
        {"domain": "exact.org", "network": "udp"},
        {"port_range": ["1000:1010", ":5"]},
    ]}))
    write(tmp_path / "list.txt", "# a Clash list\nDOMAIN-KEYWORD,tracker\n"
          "IP-CIDR6,2001:4860::/32,no-resolve\n")
    write(tmp_path / "list.yaml", "payload:\n  - DOMAIN-SUFFIX,yaml.test\n"
          "  - 'DOMAIN,quoted.test'\n")
    rules_file = write(tmp_path / "rules.txt", """
        # comment
        DOMAIN,exact.example.com,BLOCK
        DOMAIN-SUFFIX,Example.COM,direct   # trailing comment
        DOMAIN-KEYWORD,ads,REJECT
        DOMAIN-REGEX,^shop[0-9]+\\.,DIRECT
        IP-CIDR,10.0.0.0/8,DIRECT,no-resolve
        GEOIP,LAN,DIRECT
        DST-PORT,22/6000-6010,DIRECT
        NETWORK,UDP,BLOCK
        RULE-SET,set.json,DIRECT
        RULE-SET,list.txt,BLOCK
        RULE-SET,list.yaml,DIRECT
        MATCH,PROXY
    """)
    rules = load_rules([str(rules_file)])
    assert len(rules) == 12
    assert action(rules, "exact.example.com") is Action.BLOCK
    assert action(rules, "www.example.com") is Action.DIRECT
    assert action(rules, "myads.org") is Action.BLOCK
    assert action(rules, "shop12.org") is Action.DIRECT
    assert action(rules, "10.9.9.9") is Action.DIRECT
    assert action(rules, "192.168.0.1") is Action.DIRECT
    assert action(rules, "host.org", 6005) is Action.DIRECT
    assert action(rules, "host.org", 53, "udp") is Action.BLOCK
    assert action(rules, "baidu.cn", 443) is Action.DIRECT
    assert action(rules, "baidu.cn", 80) is Action.TUNNEL
    assert action(rules, "a.example.net", 8443) is Action.DIRECT
    assert action(rules, "1.0.1.1") is Action.DIRECT
    assert action(rules, "2400:da00::7") is Action.DIRECT
    assert action(rules, "host.org", 1005) is Action.DIRECT
    assert action(rules, "tracker.io") is Action.BLOCK
    assert action(rules, "2001:4860::1") is Action.BLOCK
    assert action(rules, "x.yaml.test") is Action.DIRECT
    assert action(rules, "quoted.test") is Action.DIRECT
    assert action(rules, "google.com") is Action.TUNNEL
    explained = rules.explain(Address("baidu.cn", 443))
    assert "RULE-SET,set.json,DIRECT" in explained and "set.json:rules[0]" in explained


def test_several_rules_files_apply_in_order(tmp_path: Path) -> None:
    first = write(tmp_path / "a.txt", "DOMAIN,x.org,BLOCK\n")
    second = write(tmp_path / "b.txt", "DOMAIN,x.org,DIRECT\nMATCH,DIRECT\n")
    rules = load_rules([str(first), str(second)])
    assert action(rules, "x.org") is Action.BLOCK
    assert action(rules, "y.org") is Action.DIRECT


@pytest.mark.parametrize(("line", "why"), [
    ("DOMAIN,example.com", "expected TYPE,VALUE,ACTION"),
    ("DOMAIN,example.com,FAST", "not TUNNEL, DIRECT or BLOCK"),
    ("PROCESS-NAME,curl,DIRECT", "not supported"),
    ("IP-CIDR,10.0.0.300/8,DIRECT", "not an IP network"),
    ("DST-PORT,70000,DIRECT", "not a port"),
    ("DST-PORT,9-3,DIRECT", "not a port"),
    ("NETWORK,sctp,DIRECT", "TCP or UDP"),
    ("GEOIP,CHINA,DIRECT", "two-letter"),
    ("GEOIP,CN,DIRECT", "needs country data"),
    ("DOMAIN-REGEX,(unclosed,DIRECT", "bad regex"),
    ("MATCH", "MATCH,ACTION"),
    ("RULE-SET,missing.json,DIRECT", "cannot read"),
    ("RULE-SET,binary.srs,DIRECT", "binary rule set"),
])
def test_a_bad_line_names_file_line_and_why(tmp_path: Path, line: str, why: str) -> None:
    path = write(tmp_path / "rules.txt", f"# first\nDOMAIN,ok.org,DIRECT\n{line}\n")
    with pytest.raises(ConfigError, match=why) as caught:
        load_rules([str(path)])
    assert f"{path}:3" in str(caught.value)


@pytest.mark.parametrize(("rule", "why"), [
    ({"type": "logical", "mode": "and", "rules": []}, "logical rules"),
    ({"domain": "a.org", "invert": True}, "invert is not supported"),
    ({"process_name": "curl"}, "process_name not supported"),
    ({}, "would match everything"),
    ({"domain": 5.5}, "string or a list"),
    ({"port_range": "1000"}, "not LOW:HIGH"),
    ({"network": "icmp"}, "tcp or udp"),
])
def test_singbox_rules_we_cannot_honour_are_refused(tmp_path: Path, rule: dict[str, object],
                                                     why: str) -> None:
    path = write(tmp_path / "set.json", json.dumps({"version": 2, "rules": [
        {"domain": "fine.org"}, rule]}))
    with pytest.raises(ConfigError, match=why) as caught:
        load_singbox_source(path)
    assert "rules[1]" in str(caught.value)


@pytest.mark.parametrize(("text", "why"), [
    ('{"version": 4, "rules": []}', "version 4 is not supported"),
    ('{"version": 1}', "'rules' must be a list"),
    ('{"version": 1,\n "rules": [}', r"set.json:2: not JSON"),
    ("[1]", "JSON object"),
])
def test_singbox_bad_documents(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_singbox_source(write(tmp_path / "set.json", text))


@pytest.mark.parametrize(("text", "why", "line"), [
    ("DOMAIN,a.org\nDOMAIN,b.org,DIRECT\n", "carries no action", 2),
    ("DOMAIN,a.org\nMATCH\n", "does not belong in a rule set", 2),
    ("payload:\n  - DOMAIN,a.org\n  DOMAIN,b.org\n", "under payload", 3),
    ("- DOMAIN,a.org\n", "outside a payload", 1),
    ("DOMAIN-SUFFIX,\n", "needs a value", 1),
])
def test_clash_list_errors(tmp_path: Path, text: str, why: str, line: int) -> None:
    path = write(tmp_path / "list.txt", text)
    with pytest.raises(ConfigError, match=why) as caught:
        load_clash_list(path)
    assert f"{path}:{line}" in str(caught.value)


def test_a_rule_set_given_as_the_rules_file_says_how_to_use_it(tmp_path: Path) -> None:
    path = write(tmp_path / "set.json", '{"version": 1, "rules": []}')
    with pytest.raises(ConfigError, match=r"RULE-SET,.*set\.json,DIRECT"):
        parse_rules_file(path)
    with pytest.raises(ConfigError, match=r"binary rule set.*source"):
        load_rules([str(write(tmp_path / "geosite.srs", "\x00"))])


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("veil.client.rulefiles.MAX_RULE_FILE_BYTES", 10)
    path = write(tmp_path / "rules.txt", "DOMAIN,a-long-name.example.org,DIRECT\n")
    with pytest.raises(ConfigError, match="over the 10"):
        load_rules([str(path)])


def test_the_cn_preset_from_fixture_data() -> None:
    rules = RuleSet(cn_preset(["cn", "baidu.com", "qq.com"], ["1.0.1.0/24", "2400:da00::/32"]))
    assert action(rules, "www.baidu.com") is Action.DIRECT
    assert action(rules, "gov.cn") is Action.DIRECT
    assert action(rules, "notbaidu.com") is Action.TUNNEL
    assert action(rules, "google.com") is Action.TUNNEL
    assert action(rules, "1.0.1.9") is Action.DIRECT
    assert action(rules, "2400:da00::1") is Action.DIRECT
    assert action(rules, "192.168.1.1") is Action.DIRECT
    assert action(rules, "fe80::1") is Action.DIRECT
    assert action(rules, "8.8.8.8") is Action.TUNNEL


def test_the_cn_preset_through_load_rules_and_without_data(tmp_path: Path) -> None:
    rules = load_rules(["cn"], cn_data=lambda: (["cn"], ["1.0.1.0/24"]))
    assert action(rules, "a.cn") is Action.DIRECT
    with pytest.raises(ConfigError, match="--rules cn needs the China rule data"):
        load_rules(["cn"])
    with pytest.raises(ConfigError, match="empty"):
        load_rules(["cn"], cn_data=lambda: ([], []))


def test_quic_is_udp_to_443_only(tmp_path: Path) -> None:
    """``QUIC,BLOCK``: browsers fall back to TCP where UDP is throttled; nothing else is hit."""
    path = write(tmp_path / "rules.txt", "QUIC,BLOCK\nDOMAIN-SUFFIX,home.test,DIRECT\n"
                 "MATCH,TUNNEL\n")
    rules = load_rules([str(path)])
    assert action(rules, "www.home.test", 443, "udp") is Action.BLOCK
    assert action(rules, "2001:db8::1", 443, "udp") is Action.BLOCK
    assert action(rules, "www.home.test", 443, "tcp") is Action.DIRECT
    assert action(rules, "www.home.test", 53, "udp") is Action.DIRECT
    assert action(rules, "example.org", 8443, "udp") is Action.TUNNEL
    explained = rules.explain(Address("example.org", 443), "udp")
    assert f"{path}:1 QUIC,BLOCK" in explained and "port 443 and network udp" in explained


@pytest.mark.parametrize("line", ["QUIC", "QUIC,443,BLOCK", "QUIC,FAST"])
def test_a_bad_quic_line(tmp_path: Path, line: str) -> None:
    path = write(tmp_path / "rules.txt", f"{line}\n")
    with pytest.raises(ConfigError, match=f"{path}:1: .*(QUIC,ACTION|not TUNNEL)"):
        load_rules([str(path)])
