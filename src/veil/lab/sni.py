"""SNI filtering: the name in a ClientHello against a block list, and encrypted SNI.

Sources: the GFW filters SNI on every TCP port and injects RSTs, then blocks the (client,
server, port) triple for 90 s (Rambert et al., "Chinese Wall or Swiss Cheese?", WWW 2021);
the draft ESNI extension (0xffce) has been blocked outright since July 2020 (GFW Report,
iYouPort and U. Maryland, 2020-08). A name is blocked when it equals a listed name or is a
subdomain of one. ECH (0xfe0d) is reported, not flagged: no wholesale blocking of ECH by
the GFW is documented (Russia did block it on Cloudflare in late 2024).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from veil.lab.flow import Flow
from veil.lab.tls import EXT_ENCRYPTED_CLIENT_HELLO, EXT_ENCRYPTED_SERVER_NAME, read_handshake
from veil.lab.verdict import Verdict

NAME = "sni"
SOURCE = "Rambert et al. WWW 2021; GFW Report 2020-08 (ESNI)"


class BlockList:
    """Domain names to block, each with its subdomains."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = frozenset(n.strip().lower().rstrip(".") for n in names if n.strip())

    @classmethod
    def load(cls, path: str | Path) -> BlockList:
        lines = Path(path).read_text().splitlines()
        return cls(line.split("#", 1)[0] for line in lines)

    def match(self, name: str) -> str | None:
        """The listed name that blocks ``name``, or None."""
        labels = name.lower().rstrip(".").split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate in self.names:
                return candidate
        return None


def detect(flow: Flow, blocklist: BlockList | None = None) -> Verdict:
    handshake = read_handshake(flow)
    if handshake is None or handshake.client_hello is None:
        return Verdict.not_applicable(NAME, "no TLS ClientHello")
    hello = handshake.client_hello
    types = hello.extension_types
    if EXT_ENCRYPTED_SERVER_NAME in types:
        return Verdict(NAME, True, ("ClientHello carries the ESNI extension (0xffce), blocked "
                                    "outright since 2020",), ("esni",))
    name = hello.server_name
    notes = []
    if EXT_ENCRYPTED_CLIENT_HELLO in types:
        notes.append("ClientHello carries ECH (0xfe0d); the outer SNI is what a censor sees")
    if name is None:
        return Verdict(NAME, False, ("no SNI (a connection to an IP address)", *notes),
                       details={"sni": None})
    listed = (blocklist or BlockList()).match(name)
    if listed is not None:
        return Verdict(NAME, True, (f"SNI {name!r} is on the block list (as {listed!r})", *notes),
                       ("blocked-sni",), details={"sni": name})
    return Verdict(NAME, False, (f"SNI {name!r} is not on the block list", *notes),
                   details={"sni": name})
