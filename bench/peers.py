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
``$cert``           a self-signed EC P-256 certificate; ``$cert_key`` its key
``$sni``            the certificate's name
``$python``         this interpreter; ``$bench`` the bench directory
``$veil``           the veil executable of this interpreter's environment
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
    )


_PPROXY_REMOTE = "ss://chacha20-ietf-poly1305:$password@$server_ip:$server_port"
_PPROXY = ("$python", "$bench/pproxy_launch.py")

PEERS: tuple[Peer, ...] = (
    Peer(name="direct", title="direct (ceiling)"),
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
    ),
    Peer(
        name="veil",
        title="veil",
        server=("$veil", "serve", "--self-signed",
                "--state", "$dir/state", "--listen", "$server_ip:$server_port",
                "--allow-private"),
        forward=("$veil", "connect", "$key", "--forward",
                 "127.0.0.1:$local_port:$target_host:$target_port"),
        socks=("$veil", "connect", "$key", "--socks", "127.0.0.1:$socks_port"),
        key_from_stdout=True,
        version=("$veil", "--version"),
    ),
    Peer(
        name="veil-noshape",
        title="veil, shaping off",
        server=("$veil", "serve", "--self-signed",
                "--state", "$dir/state", "--listen", "$server_ip:$server_port",
                "--allow-private", "--no-shaping"),
        forward=("$veil", "connect", "$key", "--no-shaping", "--forward",
                 "127.0.0.1:$local_port:$target_host:$target_port"),
        socks=("$veil", "connect", "$key", "--no-shaping", "--socks", "127.0.0.1:$socks_port"),
        key_from_stdout=True,
        version=("$veil", "--version"),
    ),
)

BY_NAME: dict[str, Peer] = {p.name: p for p in PEERS}
