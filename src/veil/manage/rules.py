"""Routing rules for the apps: the rule files a server serves on each user's subscription path,
and where the exports find them (``veil serve --routing cn``; docs/routing.md, "Apps").

An app imported from ``veil user show --format clash|sing-box`` (or the subscription) routes as
``veil connect --rules cn`` does: private ranges direct, China's domains direct, mainland
China's networks direct (for destinations given as addresses: no name is resolved to test
them), the rest through veil. The lists are too large to inline (110k domains), so the
exports name them by URL: each user's subscription path plus ``/rules/FILE``
(:data:`RULE_FILES`), served by veil's own server on every way in, with the subscription's
token (a wrong one is the cover's 404), from the data in ``veil.client.ruledata``. Newer data
on the server (a veil upgrade there, or ``scripts/update-ruledata`` in its checkout; then a
restart) reaches every app at its next update, with no new app configuration: GitHub, where
such lists usually come from, is unreliable from China.

Provenance: ``provenance.json`` beside the lists (source, version, data date, licence,
attribution and the SHA-256 of each served file), each Clash list's ``#`` header, and an
``ETag`` (the file's SHA-256) on every answer, so apps and clients can tell newer data. The
sing-box source files carry nothing but rules: sing-box refuses unknown fields.

``veil connect --rules cn`` following a subscription takes the same data as the packaged
files (``cn_domains.txt.gz``, ``cn_networks.txt.gz``, 0.5 MB): the signed answer lists them
(:func:`client_manifest`), and the client fetches them when they are newer than its own
(veil.client.subscription).

``VEIL_RULEDATA_DIR=DIR veil serve`` serves the data in DIR (the three files
scripts/update-ruledata writes) instead of the packaged data: newer data without a new veil.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# The one module of client/ manage/ may import (tests/unit/test_layers.py): the packaged lists
# and private ranges that `veil connect --rules cn` uses, so the apps route the same way.
from veil.client import ruledata
from veil.client.ruledata import PRIVATE_NETWORKS, RuleData
from veil.errors import ConfigError

#: The path segment after the subscription's token under which the rule files are served.
RULES_SEGMENT = "rules"
#: How often apps fetch the lists again (seconds): the data changes monthly at most, and a
#: fetch is a few MB per user.
RULES_UPDATE_INTERVAL_S = 86_400
#: The names rule providers / rule sets have in the apps' configurations.
DOMAINS_TAG = "veil-cn-domains"
NETWORKS_TAG = "veil-cn-networks"
#: The outbound sing-box exports send direct traffic to.
DIRECT_TAG = "direct"
#: What a request may ask for under ``/rules/`` (:func:`rule_files` builds them).
RULE_FILE_NAMES = frozenset(("cn-domains.txt", "cn-networks.txt", "cn-domains.json",
                             "cn-networks.json", "provenance.json", ruledata.DOMAINS_FILE,
                             ruledata.NETWORKS_FILE))
#: The environment variable naming a directory of rule data to serve instead of the packaged
#: data (the files scripts/update-ruledata writes).
RULEDATA_DIR_ENV = "VEIL_RULEDATA_DIR"


@dataclass(frozen=True, slots=True)
class RuleFile:
    body: bytes
    content_type: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def _file(body: bytes, content_type: bytes) -> tuple[RuleFile, bytes]:
    """The file and its ETag (its SHA-256, quoted), computed once: a request hashes nothing."""
    served = RuleFile(body, content_type)
    return served, b'"%s"' % served.sha256.encode()


def served_data() -> RuleData:
    """The data this server serves: ``$VEIL_RULEDATA_DIR``'s, else the packaged data
    (ConfigError when the directory's is not usable)."""
    return _data_of(os.environ.get(RULEDATA_DIR_ENV) or None)


@cache
def _data_of(directory: str | None) -> RuleData:
    if directory is None:
        return ruledata.packaged()
    try:
        return ruledata.from_dir(Path(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{RULEDATA_DIR_ENV}={directory}: not usable rule data: {exc}") from exc


def client_manifest() -> dict[str, object]:
    """What veil's subscription answer lists under ``rules`` (signed with it): per preset,
    the data's provenance and the packaged-form files with their SHA-256 and size, which a
    client fetches from ``rules/NAME`` and checks against this list."""
    return _manifest_of(served_data())


@cache
def _manifest_of(data: RuleData) -> dict[str, object]:
    return {"cn": {"data": data.info(),
                   "files": {name: {"sha256": digest, "bytes": len(body)}
                             for (name, digest), body in zip(
                                 data.file_hashes().items(), (data.domains_gz, data.networks_gz),
                                 strict=True)}}}


def _clash_list(about: dict[str, str], kind: str, lines: list[str]) -> bytes:
    header = [f"# veil {kind} ({about['source']}, version {about['version']}, data of "
              f"{about['data_date']}, {about['licence']}): {about['attribution']}",
              f"# {len(lines)} rules"]
    return ("\n".join(header + lines) + "\n").encode()


def _networks_clash(networks: list[str]) -> list[str]:
    return [f"{'IP-CIDR6' if ':' in n else 'IP-CIDR'},{n}" for n in networks]


def _singbox_source(field: str, values: list[str]) -> bytes:
    # Version 1: every sing-box with rule sets (1.8+) reads it.
    return json.dumps({"version": 1, "rules": [{field: values}]}, separators=(",", ":")).encode()


def rule_files() -> dict[str, tuple[RuleFile, bytes]]:
    """Every served file by name, with its ETag, built once per process (~0.2 s of CPU and
    ~5 MB: the server builds them before it listens when ``--routing`` is on, else at the
    first request for one)."""
    return _files_of(served_data())


@cache
def _files_of(data: RuleData) -> dict[str, tuple[RuleFile, bytes]]:
    domains, networks = data.cn_domains(), data.cn_networks()
    about = data.info()
    text = b"text/plain; charset=utf-8"
    files = {
        "cn-domains.txt": _file(_clash_list(about["domains"], "domains",
                                            [f"DOMAIN-SUFFIX,{d}" for d in domains]), text),
        "cn-networks.txt": _file(_clash_list(about["networks"], "networks",
                                             _networks_clash(networks)), text),
        "cn-domains.json": _file(_singbox_source("domain_suffix", domains), b"application/json"),
        "cn-networks.json": _file(_singbox_source("ip_cidr", networks), b"application/json"),
    }
    provenance = {"version": 1, "data": about,
                  "counts": {"domains": len(domains), "networks": len(networks)},
                  "files": {name: {"sha256": f.sha256, "bytes": len(f.body)}
                            for name, (f, _) in files.items()}}
    files["provenance.json"] = _file(json.dumps(provenance, indent=2).encode() + b"\n",
                                     b"application/json")
    # veil's own clients fetch the data as packaged: 0.5 MB instead of 3.3 MB of lists
    files[ruledata.DOMAINS_FILE] = _file(data.domains_gz, b"application/gzip")
    files[ruledata.NETWORKS_FILE] = _file(data.networks_gz, b"application/gzip")
    return files


def clash_routing(base_url: str, target: str) -> list[str]:
    """Clash Meta (mihomo) YAML lines: the rule providers and the rules; ``base_url`` is the
    user's subscription URL (no fragment), ``target`` the proxy or group veil's traffic
    takes."""
    lines = ["rule-providers:"]
    # classical: TYPE,VALUE lines, which veil's own loader reads too (client/rulefiles.py).
    for tag, name in ((DOMAINS_TAG, "cn-domains.txt"), (NETWORKS_TAG, "cn-networks.txt")):
        url = f"{base_url}/{RULES_SEGMENT}/{name}"
        lines += [f"  {tag}:", "    type: http", "    behavior: classical", "    format: text",
                  f"    url: {json.dumps(url)}", f"    path: {json.dumps('./veil/' + name)}",
                  f"    interval: {RULES_UPDATE_INTERVAL_S}"]
    lines.append("rules:")
    # no-resolve: an address rule never resolves a name to test it, so a name no domain rule
    # sends direct goes to veil as a name and the server resolves it (as veil connect does).
    lines += [f"  - {json.dumps(rule + ',DIRECT,no-resolve')}"
              for rule in _networks_clash(list(PRIVATE_NETWORKS))]
    lines += [f"  - {json.dumps(f'RULE-SET,{DOMAINS_TAG},DIRECT')}",
              f"  - {json.dumps(f'RULE-SET,{NETWORKS_TAG},DIRECT,no-resolve')}",
              f"  - {json.dumps('MATCH,' + target)}"]
    return lines


def sing_box_routing(base_url: str, final: str) -> dict[str, object]:
    """sing-box's ``route`` (1.8+ syntax, which 1.10+ still reads): private ranges and the
    rule sets to the ``direct`` outbound (:data:`DIRECT_TAG`, which the caller adds), the rest
    to ``final``."""
    return {
        "rules": [{"ip_cidr": list(PRIVATE_NETWORKS), "outbound": DIRECT_TAG},
                  {"rule_set": [DOMAINS_TAG, NETWORKS_TAG], "outbound": DIRECT_TAG}],
        "rule_set": [{"type": "remote", "tag": tag, "format": "source",
                      "url": f"{base_url}/{RULES_SEGMENT}/{name}",
                      "update_interval": f"{RULES_UPDATE_INTERVAL_S // 3600}h"}
                     for tag, name in ((DOMAINS_TAG, "cn-domains.json"),
                                       (NETWORKS_TAG, "cn-networks.json"))],
        "final": final,
    }
