"""veil: a censorship-resistant VPN whose server looks like an ordinary HTTPS website."""

from __future__ import annotations

__version__ = "0.1.0"
