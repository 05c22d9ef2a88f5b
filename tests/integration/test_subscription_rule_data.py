"""Rule data through the subscription (issue #17: new China lists without a new veil, GitHub
being unreliable from China), on a real server on loopback (``--routing cn``) serving data of
its own (``VEIL_RULEDATA_DIR``, which differs from the packaged data) and veil's real client:
it takes the served data because it is newer, caches it, starts from the cache when the server
is down, ``--explain`` says where the data came from, and a bad, oversized or garbled answer
keeps the data it had."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from pathlib import Path

import pytest

from tests.integration.test_subscription import add, with_server
from veil.cli import main
from veil.client import ruledata, subscription
from veil.client.rules import Action
from veil.client.service import load_client_rules
from veil.client.subscription import Follower
from veil.config import SubscriptionOptions
from veil.manage import rules as served_rules
from veil.manage.subscription import subscription_urls
from veil.protocol.address import Address
from veil.server.service import VeilServer

#: Only in the served data: a name the packaged data sends through the tunnel.
SERVED_ONLY = "veil-served-only.example"
#: Newer than any packaged data: the client must prefer it.
SERVED_DATE = "2099-01-01"


def write_data(directory: Path, date: str = SERVED_DATE) -> Path:
    """A rule data directory as scripts/update-ruledata writes one, with small lists."""
    directory.mkdir(parents=True)
    lists = {ruledata.DOMAINS_FILE: [SERVED_ONLY, "example.cn"],
             ruledata.NETWORKS_FILE: ["1.0.1.0/24", "2001:250::/35"]}
    for name, lines in lists.items():
        (directory / name).write_bytes(gzip.compress("\n".join(lines).encode() + b"\n",
                                                     mtime=0))
    provenance = {kind: dict(about, data_date=date, version=f"test-{date}")
                  for kind, about in ruledata.info().items()}
    (directory / ruledata.PROVENANCE_FILE).write_text(json.dumps(provenance))
    return directory


def decides(data: ruledata.RuleData, host: str) -> Action:
    return load_client_rules(("cn",), data.cn_data).decide(Address(host, 443), "tcp").action


@pytest.fixture
def served_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = write_data(tmp_path / "served")
    monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV, str(directory))
    return directory


def test_a_follower_takes_the_served_data_caches_it_and_starts_from_the_cache_offline(
        tmp_path: Path, served_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache" / "sub.json"
    assert decides(ruledata.packaged(), SERVED_ONLY) is Action.TUNNEL

    async def online(server: VeilServer) -> str:
        user = await add(server, "alice")
        url = subscription_urls(server.state, user)[0]
        follower = Follower(SubscriptionOptions(url, cache), rule_data=True)
        await follower.start()
        assert follower.rule_data is not None and follower.rule_data.updates == 1
        data = follower.rule_data.current
        assert data.dates() == (SERVED_DATE, SERVED_DATE)
        assert data.origin.startswith("from the subscription (127.0.0.1)")
        assert decides(data, SERVED_ONLY) is Action.DIRECT
        assert server.subscriptions is not None
        assert server.subscriptions.rule_files_served == 2
        # the next refresh lists the same data: nothing is fetched again
        await follower.refresh()
        assert follower.rule_data.updates == 1 and server.subscriptions.rule_files_served == 2
        return url

    url = asyncio.run(with_server(tmp_path, online, routing="cn"))
    rules_dir = subscription.rule_data_cache_path(cache)
    assert sorted(p.name for p in rules_dir.iterdir() if not p.name.endswith(".gz")) == [
        "manifest.json"]

    async def offline() -> None:  # the server is gone: the cached answer and data are used
        follower = Follower(SubscriptionOptions(url, cache), fetch_timeout=2.0, rule_data=True)
        await follower.start()
        assert follower.rule_data is not None and follower.rule_data.updates == 0
        assert follower.rule_data.current.dates() == (SERVED_DATE, SERVED_DATE)
        assert decides(follower.rule_data.current, SERVED_ONLY) is Action.DIRECT

    asyncio.run(offline())
    # --explain with the subscription: the cached data, where it came from and its date
    assert main(["connect", url, "--subscription-cache", str(cache), "--rules", "cn",
                 "--explain", SERVED_ONLY]) == 0
    out = capsys.readouterr().out
    assert f"{SERVED_ONLY}:443 -> direct" in out
    assert "cn data: from the subscription (127.0.0.1), fetched " in out
    assert f"data of {SERVED_DATE}" in out


def test_served_data_older_than_the_packaged_is_not_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV,
                       str(write_data(tmp_path / "old", date="2001-01-01")))

    async def body(server: VeilServer) -> None:
        user = await add(server, "alice")
        follower = Follower(SubscriptionOptions(subscription_urls(server.state, user)[0],
                                                tmp_path / "sub.json"), rule_data=True)
        await follower.start()
        assert follower.rule_data is not None and follower.rule_data.updates == 0
        assert follower.rule_data.current is ruledata.packaged()
        assert server.subscriptions is not None
        assert server.subscriptions.rule_files_served == 0

    asyncio.run(with_server(tmp_path, body, routing="cn"))


#: How each fault spoils the served file, whether the server's signed list is made to match
#: it (only the content is wrong then), and the reason the client must give.
FAULTS = {
    "oversized": (lambda good: good, False, "more than"),
    "truncated": (lambda good: good[:-9], False, "do not match the listed SHA-256"),
    "tampered": (lambda good: good[:-1] + bytes([good[-1] ^ 1]), False, "do not match"),
    "garbled": (lambda good: b"\x1f\x8b" + b"x" * 90, True, "not gzip"),
    "unparsable": (lambda good: gzip.compress(b"example.cn\n<script>\n", mtime=0), True,
                   "is not a domain suffix"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_bad_answer_keeps_the_data_in_use(tmp_path: Path, served_dir: Path, fault: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The server's files are spoiled after it listed them (as a broken disk or a middlebox
    would): the client refuses them with a reason and keeps the cached data it had."""
    cache = tmp_path / "sub.json"
    name = ruledata.DOMAINS_FILE

    async def body(server: VeilServer) -> None:
        user = await add(server, "alice")
        url = subscription_urls(server.state, user)[0]
        first = Follower(SubscriptionOptions(url, cache), rule_data=True)
        await first.start()
        assert first.rule_data is not None and first.rule_data.updates == 1
        # newer data on the server, then spoiled
        newer = served_rules.served_data()
        newer_dir = write_data(tmp_path / "newer", date="2099-02-01")
        monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV, str(newer_dir))
        files = served_rules.rule_files()
        manifest = served_rules.client_manifest()["cn"]
        assert isinstance(manifest, dict)
        good = files[name][0].body
        spoil, listed, reason = FAULTS[fault]
        spoiled = spoil(good)
        files[name] = (served_rules.RuleFile(spoiled, b"application/gzip"), b'"x"')
        if fault == "oversized":
            monkeypatch.setattr(subscription, "MAX_RULE_DATA_FILE_BYTES", len(good) - 1)
        if listed:
            manifest["files"][name] = {"sha256": served_rules.RuleFile(spoiled, b"").sha256,
                                       "bytes": len(spoiled)}
        follower = Follower(SubscriptionOptions(url, cache), rule_data=True)
        assert follower.rule_data is not None
        assert follower.rule_data.current.dates() == newer.dates()  # from the cache
        with caplog.at_level(logging.WARNING, "veil.client"):
            assert await follower.refresh() is not None
        assert follower.rule_data.updates == 0
        assert follower.rule_data.current.dates() == (SERVED_DATE, SERVED_DATE)
        (line,) = [r.getMessage() for r in caplog.records if "not taken" in r.getMessage()]
        assert reason in line and "keeping the data from the subscription" in line
        # the cache still holds the good data
        reloaded = Follower(SubscriptionOptions(url, cache), rule_data=True).rule_data
        assert reloaded is not None
        assert reloaded.current.dates() == (SERVED_DATE, SERVED_DATE)

    asyncio.run(with_server(tmp_path, body, routing="cn"))
