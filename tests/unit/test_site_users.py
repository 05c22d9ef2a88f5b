"""Sites as users (docs/site-to-site.md): ``veil user add NAME --site CIDR``, ``veil user
limit NAME --site/--reach``, shown in ``veil user list`` and its JSON; overlapping subnets
(another site's, or the tunnel's address pool) are refused with one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.cli import main
from veil.config import DEFAULT_TUN_POOL, DEFAULT_TUN_POOL6
from veil.manage.users import DEFAULT_POOLS


def test_the_pools_sites_are_kept_out_of_are_the_servers_defaults() -> None:
    assert DEFAULT_POOLS == (DEFAULT_TUN_POOL, DEFAULT_TUN_POOL6)


def veil(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_site_is_added_changed_listed_and_overlaps_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "state")
    code, out, err = veil(capsys, "user", "add", "office-sh", "--site", "192.168.10.0/24",
                          "--site", "fd10::/64", "--public", "127.0.0.1:4433",
                          "--state", state)
    assert code == 0, err
    assert out.startswith("veil://")
    # Another site over the same LAN, and one over the tunnel's pool: one line, exit 2,
    # and no user is left behind.
    for cidr, says in (("192.168.0.0/16", "overlaps 192.168.10.0/24 of site 'office-sh'"),
                       ("10.77.3.0/24", "overlaps 10.77.0.0/16 of the tunnel address pool")):
        code, out, err = veil(capsys, "user", "add", "office-bj", "--site", cidr,
                              "--state", state)
        assert code == 2
        assert err.strip().splitlines() == [f"veil: error: site subnet {cidr} {says}"]
    code, out, err = veil(capsys, "user", "add", "office-bj", "--site", "192.168.20.5/24",
                          "--state", state)
    assert code == 2 and "subnet" in err and len(err.strip().splitlines()) == 1
    code, out, err = veil(capsys, "user", "add", "office-bj", "--site", "192.168.20.0/24",
                          "--state", state)
    assert code == 0, err
    code, out, err = veil(capsys, "user", "add", "alice", "--state", state)
    assert code == 0, err
    code, out, err = veil(capsys, "user", "limit", "alice", "--reach", "office-sh",
                          "--reach", "10.9.0.0/16", "--state", state)
    assert code == 0, err
    assert "reach 10.9.0.0/16 office-sh" in out
    code, out, err = veil(capsys, "user", "limit", "alice", "--reach", "office-xx",
                          "--state", state)
    assert code == 2 and "no site of that name" in err
    # Changing a site's own subnets; overlapping the other site is refused.
    code, out, err = veil(capsys, "user", "limit", "office-bj", "--site", "192.168.10.128/25",
                          "--state", state)
    assert code == 2 and "overlaps 192.168.10.0/24" in err
    code, out, err = veil(capsys, "user", "limit", "office-bj", "--site",
                          "192.168.21.0/24,192.168.22.0/24", "--state", state)
    assert code == 0, err
    code, out, err = veil(capsys, "user", "list", "--json", "--state", state)
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["office-sh"]["sites"] == ["192.168.10.0/24", "fd10::/64"]
    assert rows["office-bj"]["sites"] == ["192.168.21.0/24", "192.168.22.0/24"]
    assert rows["alice"]["sites"] == [] and rows["alice"]["reach"] == ["10.9.0.0/16",
                                                                        "office-sh"]
    code, out, err = veil(capsys, "user", "list", "--state", state)
    assert "site 192.168.10.0/24,fd10::/64" in out
    code, out, err = veil(capsys, "user", "limit", "office-bj", "--site", "none",
                          "--state", state)
    assert code == 0 and "site -" in out
    # A gateway's flag is a mode of --tun, and routes only what the server announces.
    key = veil(capsys, "user", "show", "office-sh", "--state", state)[1].strip()
    for flags, says in ((["--site"], "--site is a mode of --tun"),
                        (["--tun", "--site", "--exclude", "10.0.0.0/8"], "do not apply")):
        code, out, err = veil(capsys, "connect", key, *flags)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1
