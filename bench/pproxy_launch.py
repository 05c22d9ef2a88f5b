#!/usr/bin/env python3
"""Start pproxy with an event loop already set, and refuse pure-Python ciphers.

pproxy 2.7.9 calls ``uvloop.install()`` and then ``asyncio.get_event_loop()``,
which uvloop 0.23 answers with "There is no current event loop". Here the
uvloop policy and a loop are set first and pproxy's own ``install()`` call is
made a no-op (a second install would drop the loop again). pproxy also falls
back silently to its pure-Python ciphers when pycryptodome is missing, which
would measure the wrong thing: this launcher fails instead.

Arguments are pproxy's own (``-l``, ``-r``, ...).
"""

from __future__ import annotations

import asyncio
import sys


def main() -> None:
    try:
        import Crypto  # noqa: F401  (pycryptodome: pproxy's fast ciphers)
        from Crypto.Cipher import ChaCha20_Poly1305  # noqa: F401
    except ImportError as exc:
        sys.exit(f"pproxy_launch: pycryptodome is not importable ({exc}); "
                 "pproxy would use pure-Python ciphers")
    try:
        import uvloop
    except ImportError:
        pass  # pproxy runs on the default loop then
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        uvloop.install = lambda: None  # pproxy calls it; it would reset the policy
    asyncio.set_event_loop(asyncio.new_event_loop())

    from pproxy.server import main as pproxy_main

    sys.argv[0] = "pproxy"
    pproxy_main()


if __name__ == "__main__":
    main()
