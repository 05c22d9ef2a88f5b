"""The `cn` preset's shipped rule data: parseable, anchored, free of foreign services, traced.

Also the generator's own logic (scripts/update-ruledata), on small inputs and without the
network: normalisation, exclusions, CIDR merging, byte-identical output."""

from __future__ import annotations

import bisect
import datetime
import gzip
import hashlib
import importlib.util
import ipaddress
import json
import re
from importlib import resources
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

from veil.client import ruledata

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "update-ruledata"

# Foreign services that users of "China" lists saw broken when the list sent them direct: this
# test's own list, kept apart from the script's, so that a change to the script's exclusions
# cannot quietly let one of them through.
MUST_STAY_TUNNELLED = (
    "google.com", "www.google.com", "gstatic.com", "fonts.gstatic.com", "googleapis.com",
    "fonts.googleapis.com", "ajax.googleapis.com", "googleusercontent.com", "googlevideo.com",
    "youtube.com", "ytimg.com", "facebook.com", "fbcdn.net", "instagram.com", "twitter.com",
    "twimg.com", "x.com", "t.co", "telegram.org", "t.me", "whatsapp.com", "whatsapp.net",
    "github.com", "githubusercontent.com", "raw.githubusercontent.com", "wikipedia.org",
)
DOMAIN_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


def suffixes(name: str) -> list[str]:
    """``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``: the entries of a suffix list that match it."""
    labels = name.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


class NetworkSet:
    """Membership by binary search over the merged, sorted, non-overlapping networks."""

    def __init__(self, cidrs: list[str]) -> None:
        nets = sorted((ipaddress.ip_network(c) for c in cidrs),
                      key=lambda n: (n.version, int(n.network_address)))
        self.keys = [(n.version, int(n.network_address)) for n in nets]
        self.nets = nets

    def __contains__(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        i = bisect.bisect_right(self.keys, (ip.version, int(ip))) - 1
        return i >= 0 and self.nets[i].version == ip.version and ip in self.nets[i]


@pytest.fixture(scope="module")
def networks() -> list[str]:
    return ruledata.cn_networks()


@pytest.fixture(scope="module")
def network_set(networks: list[str]) -> NetworkSet:
    return NetworkSet(networks)


@pytest.fixture(scope="module")
def domains() -> list[str]:
    return ruledata.cn_domains()


def test_networks_are_strict_cidrs_ipv4_then_ipv6_merged(networks: list[str]) -> None:
    parsed = [ipaddress.ip_network(c, strict=True) for c in networks]
    versions = [n.version for n in parsed]
    assert versions == sorted(versions)
    v4 = [n for n in parsed if n.version == 4]
    v6 = [n for n in parsed if n.version == 6]
    assert len(v4) > 1000 and len(v6) > 1000
    assert list(ipaddress.collapse_addresses(v4)) == v4  # minimal: nothing left to merge
    assert list(ipaddress.collapse_addresses(v6)) == v6


@pytest.mark.parametrize("address", [
    "114.114.114.114",  # 114DNS, Nanjing
    "223.5.5.5",  # AliDNS
    "180.76.76.76",  # Baidu public DNS
    "2400:3200::1",  # AliDNS over IPv6
])
def test_chinese_networks_are_in(network_set: NetworkSet, address: str) -> None:
    assert address in network_set


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "9.9.9.9", "2001:4860:4860::8888", "2606:4700:4700::1111",
    "10.0.0.1", "127.0.0.1", "192.168.1.1", "::1",
])
def test_foreign_and_private_addresses_are_out(network_set: NetworkSet, address: str) -> None:
    assert address not in network_set


def test_domains_are_lower_case_sorted_unique_suffixes(domains: list[str]) -> None:
    assert len(domains) > 10_000
    assert domains == sorted(set(domains))
    bad = [d for d in domains if not DOMAIN_RE.match(d) or len(d) > 253]
    assert bad == []
    present = set(domains)
    covered = [d for d in domains if any(s in present for s in suffixes(d)[1:])]
    assert covered == [], "an entry under another entry adds nothing to a suffix list"


@pytest.mark.parametrize("name", ["baidu.com", "www.baidu.com", "qq.com", "weixin.qq.com",
                                  "taobao.com", "gov.cn", "www.12306.cn"])
def test_chinese_domains_are_in(domains: list[str], name: str) -> None:
    assert set(suffixes(name)) & set(domains)


@pytest.mark.parametrize("name", MUST_STAY_TUNNELLED)
def test_foreign_services_are_not_sent_direct(domains: list[str], name: str) -> None:
    # Neither the name nor any parent of it (a "com" entry would send all of them direct) ...
    assert set(suffixes(name)) & set(domains) == set()
    # ... nor any name under it (www.gstatic.com in the list breaks Google as much).
    assert [d for d in domains if d.endswith("." + name)] == []


def test_info_says_source_licence_and_age() -> None:
    info = ruledata.info()
    assert set(info) == {"networks", "domains"}
    for kind, fields in info.items():
        assert set(fields) == set(ruledata.INFO_FIELDS), kind
        assert all(value.strip() for value in fields.values()), kind
        datetime.date.fromisoformat(fields["data_date"])
    assert info["networks"]["licence"] == "CC-BY-4.0"
    assert "DB-IP" in info["networks"]["attribution"]
    assert info["domains"]["licence"] == "WTFPL-2.0"


def test_provenance_pins_inputs_and_outputs() -> None:
    folder = resources.files(ruledata.__name__)
    provenance = json.loads(folder.joinpath(ruledata.PROVENANCE_FILE).read_text())
    assert re.fullmatch(r"sha512-[A-Za-z0-9+/]+=*", provenance["networks"]["input_integrity"])
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["domains"]["input_sha256"])
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["domains"]["version"])
    names = {ruledata.NETWORKS_FILE, ruledata.DOMAINS_FILE, "LICENSES.md"}
    assert set(provenance["files"]) == names
    for name in names:  # the shipped files are the ones the generator wrote
        digest = hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest()
        assert provenance["files"][name] == digest, name
    count = provenance["networks"]["count_ipv4"] + provenance["networks"]["count_ipv6"]
    assert count == len(ruledata.cn_networks())
    assert provenance["domains"]["count"] == len(ruledata.cn_domains())


def test_licences_carry_the_required_attribution() -> None:
    text = resources.files(ruledata.__name__).joinpath("LICENSES.md").read_text()
    assert "IP Geolocation by DB-IP" in text and "https://db-ip.com" in text
    assert "creativecommons.org/licenses/by/4.0" in text
    assert "Do What The Fuck You Want To Public License" in text


def test_loaders_return_fresh_lists() -> None:
    first = ruledata.cn_domains()
    first.clear()
    assert ruledata.cn_domains(), "a caller's change must not reach the next caller"


# --- the generator ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def script() -> ModuleType:
    loader = SourceFileLoader("update_ruledata", str(SCRIPT))
    spec = importlib.util.spec_from_loader("update_ruledata", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_generator_normalises_and_excludes(script: ModuleType) -> None:
    conf = "\n".join([
        "# a comment",
        "#server=/disabled.example/114.114.114.114",
        "server=/BAIDU.com./114.114.114.114",
        "server=/tieba.baidu.com/114.114.114.114",
        "server=/baidu.com/114.114.114.114",
        "server=/www.gstatic.com/114.114.114.114",
        "server=/googleapis.com/114.114.114.114",
        "server=/top/114.114.114.114",
        "server=/cn/114.114.114.114",
        "server=/www.12306.cn/114.114.114.114",
        "",
    ])
    kept, excluded = script.normalised_domains(conf)
    assert kept == ["baidu.com", "cn"]
    assert excluded == ["googleapis.com", "top", "www.gstatic.com"]


def test_generator_refuses_a_parent_of_a_tunnelled_service(script: ModuleType) -> None:
    with pytest.raises(SystemExit, match="covers the tunnelled service"):
        script.normalised_domains("server=/com/114.114.114.114\n")


def test_generator_refuses_what_is_not_a_domain(script: ModuleType) -> None:
    with pytest.raises(SystemExit, match="not a domain name"):
        script.normalised_domains("server=/bad_name.com/114.114.114.114\n")


def test_generator_merges_ranges_into_fewest_cidrs(script: ModuleType) -> None:
    csv_text = ("1.0.0.0,1.0.0.255,AU\n1.0.1.0,1.0.3.255,CN\n1.0.4.0,1.0.7.255,CN\n"
                "1.0.8.0,1.0.8.255,HK\n")
    nets = script.merged_networks(script.cn_ranges(csv_text))
    assert [str(n) for n in nets] == ["1.0.1.0/24", "1.0.2.0/23", "1.0.4.0/22"]


def test_generator_gzip_is_byte_identical(script: ModuleType) -> None:
    first = script.gzip_text(["a.cn", "b.cn"])
    assert first == script.gzip_text(["a.cn", "b.cn"])
    assert gzip.decompress(first) == b"a.cn\nb.cn\n"


def test_excluded_services_are_all_tunnelled_by_the_test_too(script: ModuleType) -> None:
    # The script may exclude more than this test checks, never less.
    for name in MUST_STAY_TUNNELLED:
        assert any(name == s or name.endswith("." + s) for s in script.FOREIGN_SERVICES), name


def test_rule_data_received_is_checked_before_use() -> None:
    """What a client receives through its subscription must be the packaged form: a gzip
    bomb, a truncated or trailing-garbage file, a line that is not a suffix or a network, or
    a provenance without ISO dates is refused (ValueError)."""
    import gzip
    import zlib

    packaged = ruledata.packaged()
    packaged.check()

    def data(domains: bytes = gzip.compress(b"example.cn\n", mtime=0),
             networks: bytes = gzip.compress(b"1.0.1.0/24\n", mtime=0),
             date: str = "2099-01-01") -> ruledata.RuleData:
        provenance = {kind: dict(about, data_date=date) for kind, about in
                      packaged.info().items()}
        return ruledata.RuleData(domains, networks, provenance)

    data().check()
    bomb = zlib.compressobj(wbits=31)
    big = bomb.compress(b"a" * (ruledata.MAX_EXPANDED_BYTES + 1)) + bomb.flush()
    good = gzip.compress(b"example.cn\n", mtime=0)
    for spoiled, reason in ((big, "once decompressed"), (good[:-3], "truncated"),
                            (good + b"x", "truncated, or followed"), (b"x" * 40, "not gzip"),
                            (gzip.compress(b"example.cn\nex ample\xff\n"), "not ASCII"),
                            (gzip.compress(b"-bad.cn\n"), "not a domain suffix"),
                            (gzip.compress(b""), "empty")):
        with pytest.raises(ValueError, match=reason):
            data(domains=spoiled).check()
    with pytest.raises(ValueError, match=r"1\.0\.1\.1/24"):
        data(networks=gzip.compress(b"1.0.1.1/24\n")).check()
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        data(date="soon").check()
    assert data().is_newer_than(packaged) and not packaged.is_newer_than(data())
    assert not data(date="2001-01-01").is_newer_than(packaged)
    # one list newer, the other older: not taken (the lists are judged together)
    assert not ruledata.is_newer(("2099-01-01", "2001-01-01"), packaged.dates())
