"""What every fuzz target shares: how an input is cut into reads, and the atheris entry point.

A target is a module ``fuzz_<name>.py`` in this directory with

* ``test_one_input(data: bytes) -> None``: run the parser on ``data`` and check its invariants;
  anything it raises is a finding (``AssertionError`` for a broken invariant);
* ``seeds() -> dict[str, bytes]``: valid messages made with veil's own encoders and edge
  cases, written to ``corpus/<name>/`` by ``run.py --write-seeds``;
* ``MODULES``: the modules whose code atheris instruments for coverage (only these: each
  function costs a few milliseconds to instrument, and the budget in CI is seconds).

The targets import nothing from atheris at module level, so tests replay seeds and saved
crashes through ``test_one_input`` without it (tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
SRC_DIR = FUZZ_DIR.parent / "src"
if SRC_DIR.is_dir() and str(SRC_DIR) not in sys.path:
    sys.path.insert(0, str(SRC_DIR))  # run from a checkout without installing veil

# Reads are at most this big: 2**15 covers a TLS record, a SOCKS5 read, a header buffer.
_MAX_PIECE_SHIFT = 15


def pieces(data: bytes, selector: int) -> list[bytes]:
    """Cut ``data`` into consecutive reads, as a socket might deliver them.

    ``selector`` (one input byte) picks the cutting: 0 keeps ``data`` whole; otherwise its low
    four bits bound the read size (1 to 32 KiB, powers of two) and the whole byte seeds the
    sizes, so every cutting is reproducible from the input alone.
    """
    if selector == 0 or not data:
        return [data]
    limit = 1 << min(selector & 0x0F, _MAX_PIECE_SHIFT)
    state = selector
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF  # a tiny LCG: cheap and fixed
        size = 1 + state % limit
        out.append(data[pos : pos + size])
        pos += size
    return out


def _instrument(modules: Sequence[str]) -> int:
    """Add atheris's coverage instrumentation to every function defined in ``modules``."""
    import atheris  # noqa: PLC0415 - only the fuzzing process needs it

    wanted = set(modules)
    count = 0
    seen: set[int] = set()
    for name in wanted:
        module = sys.modules.get(name)
        if module is None:
            raise SystemExit(f"instrumenting {name}: not imported by the target")
        for value in vars(module).values():
            candidates: list[object] = [value]
            if isinstance(value, type) and value.__module__ == name:
                candidates = list(vars(value).values())
            for item in candidates:
                func = item.__func__ if isinstance(item, (classmethod, staticmethod)) else item
                if isinstance(func, property):
                    func = func.fget
                if (isinstance(func, types.FunctionType) and func.__module__ == name
                        and id(func) not in seen):
                    seen.add(id(func))
                    atheris.instrument_func(func)
                    count += 1
    return count


def main(test_one_input: Callable[[bytes], None], modules: Sequence[str]) -> None:
    """Run libFuzzer on ``test_one_input``; ``sys.argv`` holds libFuzzer's flags and corpora."""
    import atheris  # noqa: PLC0415

    count = _instrument(modules)
    print(f"INFO: instrumented {count} functions of {len(modules)} modules", file=sys.stderr)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
