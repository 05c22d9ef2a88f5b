"""``veil serve --via`` and a repeated ``--listen``: checked options, remembered in the state,
named in every key and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.config import ServerOptions, parse_via
from veil.errors import ConfigError
from veil.manage.export import export_user
from veil.manage.state import init_state, load_state, record_start
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import MAX_VIA
from veil.store.base import User

LISTEN = Address("127.0.0.1", 443)
VIAS = parse_via(["tls://203.0.113.7:8443", "https://cdn.example.org/Zm9vYmFyYmF6cXV4cXV1eA/"])


def user() -> User:
    return User(name="alice", secret=bytes(range(32)), key_id=b"k" * 16, created_at=0.0)


def test_via_and_extra_listen_addresses_are_checked() -> None:
    ServerOptions(listen=LISTEN, also_listen=(Address("127.0.0.1", 8443),), via=VIAS)
    # Port 0 (the system picks) may be asked for twice.
    ServerOptions(listen=Address("127.0.0.1", 0), also_listen=(Address("127.0.0.1", 0),))
    with pytest.raises(ConfigError, match="--listen names the same address twice"):
        ServerOptions(listen=LISTEN, also_listen=(LISTEN,))
    with pytest.raises(ConfigError, match="--via names the same way in twice"):
        ServerOptions(listen=LISTEN, via=VIAS + VIAS[:1])
    with pytest.raises(ConfigError, match=f"at most {MAX_VIA}"):
        ServerOptions(listen=LISTEN,
                      via=parse_via([f"tls://203.0.113.7:{p}" for p in range(1, MAX_VIA + 2)]))
    with pytest.raises(ConfigError, match=r"^--via: way in '203\.0\.113\.7:1' is not a URL"):
        parse_via(["203.0.113.7:1"])


def test_the_state_remembers_the_ways_in_and_every_key_names_them(tmp_path: Path) -> None:
    state, _ = init_state(tmp_path, listen=LISTEN, via=VIAS)
    assert json.loads((tmp_path / "config.json").read_text())["via"] == [
        "tls://203.0.113.7:8443", "https://cdn.example.org/Zm9vYmFyYmF6cXV4cXV1eA/"]
    state = load_state(tmp_path)
    assert state.via == VIAS
    key = AccessKey.parse(export_user(state, user(), "veil").text)
    assert key.via == VIAS and key.server == LISTEN
    # `veil user add --public` (via None) keeps them; a start says them anew.
    assert init_state(tmp_path, listen=LISTEN)[0].via == VIAS
    assert init_state(tmp_path, listen=LISTEN, via=())[0].via == ()
    record_start(tmp_path, trojan=True, via=VIAS[:1])
    assert load_state(tmp_path).via == VIAS[:1]


def test_a_via_that_is_the_public_address_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is the public address already"):
        init_state(tmp_path, listen=LISTEN, via=parse_via(["tls://127.0.0.1:443"]))


def test_a_damaged_via_in_the_state_is_reported(tmp_path: Path) -> None:
    init_state(tmp_path, listen=LISTEN)
    config = json.loads((tmp_path / "config.json").read_text())
    config["via"] = ["tls://nowhere"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json is damaged"):
        load_state(tmp_path)


def test_the_trojan_formats_say_they_carry_one_way_in(tmp_path: Path) -> None:
    init_state(tmp_path, listen=LISTEN, via=VIAS)
    record_start(tmp_path, trojan=True, via=VIAS)
    exported = export_user(load_state(tmp_path), user(), "trojan")
    assert any("names 127.0.0.1:443 only" in warning and "tls://203.0.113.7:8443" in warning
               for warning in exported.warnings)
