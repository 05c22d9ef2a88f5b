"""Rules from files (veil.client.rulefiles): veil's rules file, sing-box source, Clash lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import veil
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


# The patterns Python's re backtracks on exponentially (nested quantifiers, a quantified group
# that can match the same text in many ways), each against the longest name DNS allows.
CATASTROPHIC = [(r"(a+)+$", "a" * 252 + "!"), (r"(.*a){20}", "b" * 253),
                (r"^(a|aa)+$", "a" * 252 + "!"), (r"(\w+\.?)+x$", "a" * 253)]


def test_regex_rules_decide_in_linear_time_even_on_catastrophic_patterns(tmp_path: Path) -> None:
    """DOMAIN-REGEX and domain_regex come from files other people write (rule sets, a server's
    subscription): a pattern that backtracks must not freeze the client's event loop. Run in a
    child process, so that a matcher that backtracks fails this test by its timeout instead of
    hanging the suite (Python's re does not let go of a match in progress)."""
    rules_text = "".join(f"DOMAIN-REGEX,{pattern},BLOCK\n" for pattern, _ in CATASTROPHIC)
    write(tmp_path / "rules.txt", rules_text + "MATCH,TUNNEL\n")
    write(tmp_path / "set.json", json.dumps({"version": 2, "rules": [
        {"domain_regex": [pattern for pattern, _ in CATASTROPHIC]}]}))
    write(tmp_path / "sub.txt", "RULE-SET,set.json,BLOCK\n")
    child = f"""
import sys, time
from veil.client.rulefiles import load_rules
from veil.protocol.address import Address
worst = 0.0
for source in {[str(tmp_path / "rules.txt"), str(tmp_path / "sub.txt")]!r}:
    rules = load_rules([source])
    for name in {[name for _, name in CATASTROPHIC]!r}:
        start = time.perf_counter()
        rules.decide(Address(name, 443))
        worst = max(worst, time.perf_counter() - start)
print(worst)
"""
    src = Path(veil.__file__).parents[1]
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(src)}, timeout=30, check=True)
    # Python's re takes ~0.5 s at 22 characters and doubles per character; RE2 takes
    # microseconds. A second allows for any load on the machine running the tests.
    assert float(done.stdout) < 1.0, done.stdout


def test_ordinary_regex_rules_still_match(tmp_path: Path) -> None:
    rules = load_rules([str(write(tmp_path / "rules.txt",
                                  "DOMAIN-REGEX,^ad[0-9]+\\.,BLOCK\n"
                                  "DOMAIN-REGEX,(^|\\.)ads?\\.,BLOCK\n"))])
    for blocked in ("ad12.example.com", "AD7.Example.com", "ads.example.com", "ad.example.com",
                    "x.ads.example.com"):
        assert action(rules, blocked) is Action.BLOCK, blocked
    for tunnelled in ("adx.example.com", "badads.example.com", "example.ad"):
        assert action(rules, tunnelled) is Action.TUNNEL, tunnelled
    assert "domain_regex ^ad[0-9]+\\." in rules.explain(Address("ad1.example.com", 443))


@pytest.mark.parametrize(("pattern", "why"), [
    ("^(?=ads).*", "no look-around"),  # Python's re has it, RE2 (and Go's, sing-box's) not
    ("(ad)\\1", "no back-references"),
    ("a" * 1025, "over the 1024"),
])
def test_regexes_rules_cannot_use_are_refused_with_their_line(tmp_path: Path, pattern: str,
                                                              why: str) -> None:
    path = write(tmp_path / "rules.txt", f"DOMAIN,ok.org,DIRECT\nDOMAIN-REGEX,{pattern},BLOCK\n")
    with pytest.raises(ConfigError, match=why) as caught:
        load_rules([str(path)])
    assert f"{path}:2" in str(caught.value)
    rule_set = write(tmp_path / "set.json", json.dumps({"version": 2, "rules": [
        {"domain": "fine.org"}, {"domain_regex": pattern}]}))
    with pytest.raises(ConfigError, match=why) as caught:
        load_singbox_source(rule_set)
    assert f"{rule_set}:rules[1]" in str(caught.value)
