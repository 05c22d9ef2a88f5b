#!/usr/bin/env python3
"""Run veil's fuzz targets for a bounded time each; exit 1 if any of them crashes.

::

    python3 fuzz/run.py --seconds 10               # every target, 10 s each (what CI runs)
    python3 fuzz/run.py frames socks5 --seconds 600  # some targets, longer
    python3 fuzz/run.py --write-seeds              # regenerate corpus/<target>/ from seeds()
    python3 fuzz/run.py --list

Each target runs in its own subprocess (libFuzzer owns the process: a crash kills it). The
seeds in ``corpus/<target>/`` are read but never written: what libFuzzer finds goes to a
scratch corpus (``--work DIR`` keeps it between runs). A crashing input is written to
``crashes/<target>/`` (``--crashes DIR`` to put it elsewhere) where it stays as a regression
case: tests/fuzz/test_fuzz.py replays every file there.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
CRASHES_DIR = FUZZ_DIR / "crashes"
# Seeds stay small so the repository does too (and replaying them stays fast).
MAX_SEEDS = 30
MAX_SEED_BYTES = 4096
# One input may take this long before libFuzzer calls it a hang (a crash).
TIMEOUT_S = 10
# A target whose memory grows past this is a finding too (unbounded buffers).
RSS_LIMIT_MB = 1024
# libFuzzer's default cap is 4096 bytes; the parsers' interesting states (a 16 KiB TLS
# record, an 8 KiB header buffer, a 64 KiB datagram) need more.
MAX_LEN = 70_000


def targets() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py"))


@dataclass
class Result:
    target: str
    returncode: int
    runs: int
    seconds: float
    crashes: list[Path]
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.crashes

    @property
    def execs_per_second(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0


def run_target(target: str, seconds: int, *, work: Path, crashes: Path) -> Result:
    seeds = CORPUS_DIR / target
    scratch = work / target
    scratch.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    cmd = [sys.executable, str(FUZZ_DIR / f"fuzz_{target}.py"),
           f"-max_total_time={seconds}", f"-timeout={TIMEOUT_S}",
           f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={MAX_LEN}",
           f"-artifact_prefix={crashes}/", "-print_final_stats=1",
           str(scratch), str(seeds)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                          timeout=seconds + 120, check=False)
    elapsed = time.monotonic() - started
    log = proc.stdout + proc.stderr
    found = sorted(set(crashes.iterdir()) - before)
    found_runs = (re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
                  or re.search(r"Done (\d+) runs", log))
    runs = int(found_runs.group(1)) if found_runs else 0
    fuzz_seconds = seconds
    if match := re.search(r"Done \d+ runs in (\d+) second", log):
        fuzz_seconds = max(int(match.group(1)), 1)
    return Result(target, proc.returncode, runs, min(fuzz_seconds, elapsed), found, log)


def write_seeds(names: list[str]) -> None:
    sys.path.insert(0, str(FUZZ_DIR))
    for name in names:
        module = importlib.import_module(f"fuzz_{name}")
        seeds: dict[str, bytes] = module.seeds()
        if len(seeds) > MAX_SEEDS:
            raise SystemExit(f"{name}: {len(seeds)} seeds, more than {MAX_SEEDS}")
        out = CORPUS_DIR / name
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            old.unlink()
        for seed_name, data in seeds.items():
            if len(data) > MAX_SEED_BYTES:
                raise SystemExit(f"{name}/{seed_name}: {len(data)} bytes > {MAX_SEED_BYTES}")
            module.test_one_input(data)  # a seed that fails is a bug in the seed or the code
            (out / seed_name).write_bytes(data)
        print(f"{name}: {len(seeds)} seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("targets", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--seconds", type=int, default=10, help="fuzzing time per target")
    parser.add_argument("--work", type=Path, help="keep the grown corpus here between runs")
    parser.add_argument("--crashes", type=Path,
                        help="write crashing inputs here (default: crashes/<target>/)")
    parser.add_argument("--write-seeds", action="store_true", help="regenerate corpus/")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("-v", "--verbose", action="store_true", help="print libFuzzer's log")
    args = parser.parse_args(argv)

    known = targets()
    names = args.targets or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)}; there are {', '.join(known)}")
    if args.list:
        print("\n".join(known))
        return 0
    if args.write_seeds:
        write_seeds(names)
        return 0

    failed = []
    with tempfile.TemporaryDirectory(prefix="veil-fuzz-") as tmp:
        work = args.work or Path(tmp)
        for name in names:
            crashes = (args.crashes / name) if args.crashes else CRASHES_DIR / name
            result = run_target(name, args.seconds, work=work, crashes=crashes)
            status = "ok" if result.ok else f"FAILED (exit {result.returncode})"
            print(f"{name:12} {status:18} {result.runs:>9} runs  "
                  f"{result.execs_per_second:>8.0f} exec/s", flush=True)
            if args.verbose or not result.ok:
                print(_tail(result.log), flush=True)
            for crash in result.crashes:
                print(f"  kept {crash}", flush=True)
            if not result.ok:
                failed.append(name)
    if failed:
        print(f"crashed: {', '.join(failed)}")
        return 1
    return 0


def _tail(log: str, lines: int = 60) -> str:
    return "\n".join(log.splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit(main())
