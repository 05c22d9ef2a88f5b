"""TUN mode where veil has no implementation yet (anything but Linux): a clear error."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from veil.errors import ConfigError
from veil.protocol.accesskey import AccessKey
from veil.protocol.session import SessionConfig

UNSUPPORTED = "--tun is supported on Linux only; use the SOCKS5 or HTTP proxy here"


@dataclass(frozen=True, slots=True)
class TunClientOptions:
    exclude: tuple[str, ...] = ()

    @classmethod
    def parse(cls, exclude: Iterable[str], rules: Any = None, *,
              site: bool = False) -> TunClientOptions:
        return cls(tuple(exclude))


async def run_tun(key: AccessKey, options: TunClientOptions, stop: asyncio.Event, *,
                  tls_stack: str = "browser", session_config: SessionConfig | None = None) -> None:
    raise ConfigError(UNSUPPORTED)


def cleanup(options: TunClientOptions) -> bool:
    raise ConfigError(UNSUPPORTED)
