"""The rule files on the subscription path (issue #17: the apps route like ``veil connect
--rules cn``) on a real server on loopback: each answers a valid token over HTTP/1.1 and
HTTP/2 and under a CDN way's secret path, with an ETag and provenance, and parses with veil's
own loaders (client/rulefiles.py) to the packaged data's size; a wrong token, a revoked user
or an unknown file is the cover's 404, byte for byte; the exports a ``--routing cn`` server
hands out name URLs that answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import yaml

from tests.integration.test_subscription import (
    _DATE,
    add,
    h1_get,
    h2_get,
    split,
    token_path,
    with_server,
)
from veil.client import ruledata
from veil.client.rulefiles import load_clash_list, load_singbox_source
from veil.server.service import VeilServer

CDN_SECRET = "/Zm9vYmFyYmF6cXV4cXV1eA/"
FILES = ("cn-domains.txt", "cn-networks.txt", "cn-domains.json", "cn-networks.json",
         "provenance.json")


def test_each_rule_file_answers_a_valid_token_and_parses_with_veils_loaders(
        tmp_path: Path) -> None:
    domains, networks = ruledata.cn_domains(), ruledata.cn_networks()

    async def body(server: VeilServer) -> None:
        await add(server, "alice")
        port = server.address.port
        path = token_path(server, "alice")
        secret_path = CDN_SECRET + path.lstrip("/")
        got: dict[str, bytes] = {}
        for name in FILES:
            status, headers, h1_body = split(await h1_get(port, f"{path}/rules/{name}"))
            assert status == 200, (name, h1_body[:200])
            assert headers[b"etag"] == b'"%s"' % hashlib.sha256(h1_body).hexdigest().encode()
            assert headers[b"content-type"] == (b"application/json" if name.endswith(".json")
                                                else b"text/plain; charset=utf-8")
            h2_headers, h2_body = await h2_get(port, f"{path}/rules/{name}")
            assert h2_headers[b":status"] == b"200" and h2_body == h1_body
            # the same under the CDN way's secret path (what a CDN forwards)
            assert split(await h1_get(port, f"{secret_path}/rules/{name}"))[2] == h1_body
            got[name] = h1_body
        for name, data in got.items():
            (tmp_path / name).write_bytes(data)
        clash_domains = load_clash_list(tmp_path / "cn-domains.txt")
        assert [c.suffixes for c in clash_domains] == [(d,) for d in domains]
        clash_networks = load_clash_list(tmp_path / "cn-networks.txt")
        assert [str(c.networks_ip[0]) for c in clash_networks] == networks
        (singbox_domains,) = load_singbox_source(tmp_path / "cn-domains.json")
        assert list(singbox_domains.suffixes) == domains
        (singbox_networks,) = load_singbox_source(tmp_path / "cn-networks.json")
        assert [str(n) for n in singbox_networks.networks_ip] == networks
        assert len(domains) > 100_000 and len(networks) > 10_000  # the whole lists
        provenance = json.loads(got["provenance.json"])
        assert provenance["data"] == ruledata.info()
        assert provenance["counts"] == {"domains": len(domains), "networks": len(networks)}
        for name in FILES[:-1]:
            assert provenance["files"][name] == {
                "sha256": hashlib.sha256(got[name]).hexdigest(), "bytes": len(got[name])}
        # each Clash list says where it comes from and how old it is, in comments
        first_line = got["cn-networks.txt"].split(b"\n", 1)[0].decode()
        assert ruledata.info()["networks"]["data_date"] in first_line
        assert "db-ip.com" in first_line
        assert server.subscriptions is not None
        assert server.subscriptions.rule_files_served == 3 * len(FILES)

    asyncio.run(with_server(tmp_path, body, via=("wss://cdn.example.org" + CDN_SECRET,)))


def test_a_wrong_token_a_revoked_user_or_an_unknown_file_is_the_cover_404(
        tmp_path: Path) -> None:
    async def body(server: VeilServer) -> None:
        await add(server, "alice")
        port = server.address.port
        path = token_path(server, "alice")
        wrong = path[:-1] + ("A" if path[-1] != "A" else "B")

        async def both(target: str) -> tuple[bytes, tuple[dict[bytes, bytes], bytes]]:
            h1 = _DATE.sub(b"\r\nDate: -\r\n", await h1_get(port, target))
            headers, h2_body = await h2_get(port, target)
            headers.pop(b"date")
            return h1, (headers, h2_body)

        reference = await both("/s/" + "x" * 22 + "/rules/cn-domains.txt")
        assert reference[0].startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert await both(f"{wrong}/rules/cn-domains.txt") == reference
        assert await both(f"{path}/rules/cn-domains.yaml") == reference
        assert await both(f"{path}/rules/") == reference
        assert await both(f"{path}/rules/x/cn-domains.txt") == reference
        assert split(await h1_get(port, f"{path}/rules/cn-networks.txt"))[0] == 200
        server.users.revoke("alice")
        await server.live.tick()
        assert await both(f"{path}/rules/cn-networks.txt") == reference

    asyncio.run(with_server(tmp_path, body))


def test_a_routing_servers_clash_export_names_lists_it_serves(tmp_path: Path) -> None:
    """`veil serve --routing cn`: the subscription's Clash config carries the rules, and the
    URLs its rule providers name are answered by this server."""
    async def body(server: VeilServer) -> None:
        await add(server, "alice")
        port = server.address.port
        status, _, text = split(await h1_get(port, f"{token_path(server, 'alice')}"
                                                   "?format=clash"))
        assert status == 200
        config = yaml.safe_load(text)
        assert config["rules"][-1] == "MATCH,alice"
        for provider in config["rule-providers"].values():
            target = "/" + provider["url"].split("/", 3)[3]
            status, _, listed = split(await h1_get(port, target))
            assert status == 200 and listed.startswith(b"# veil ")
        status, _, text = split(await h1_get(port, f"{token_path(server, 'alice')}"
                                                   "?format=sing-box"))
        route = json.loads(text)["route"]
        assert route["final"] == "alice"
        for rule_set in route["rule_set"]:
            status, _, listed = split(await h1_get(port, "/" + rule_set["url"].split("/", 3)[3]))
            assert status == 200 and json.loads(listed)["version"] == 1

    asyncio.run(with_server(tmp_path, body, routing="cn"))
