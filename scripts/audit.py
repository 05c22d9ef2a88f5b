"""The dependency audit (run by scripts/test; `.venv/bin/python scripts/audit.py`).

1. pip-audit against each lock file. pip-audit reports "No known vulnerabilities found" even
   when it could look none of them up (every package "skipped": the vulnerability service was
   unreachable), so this counts what it actually audited: a finding fails the run, and so
   do an audit that looked up only some packages, pip-audit failing, and an audit that looked
   up nothing — unless VEIL_AUDIT_OFFLINE=1 says this machine reaches no vulnerability
   database (this project's CI reaches package indexes only; .ci/run sets it).
2. requirements/advisories.toml, the advisories this project tracks, against every version in
   the lock files and against pyproject.toml's floors: a lock or a floor inside an affected
   range fails the run. Where pip-audit reached no database (this project's CI reaches
   package indexes only), this is the audit that ran, and the output says so.

Exit status 0: clean; 1: a finding (or a partial pip-audit run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK_NAMES = ("veil.lock", "test.lock")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)
# pip-audit asks PyPI about each package; a slow index gets this long per request.
PIP_AUDIT_TIMEOUT_S = 15


def locked(lock: Path) -> dict[str, set[Version]]:
    """Package -> the versions the lock pins (a universal lock may pin two, per platform)."""
    pins: dict[str, set[Version]] = {}
    for name, version in PIN.findall(lock.read_text()):
        pins.setdefault(canonicalize_name(name), set()).add(Version(version))
    return pins


def floors(root: Path) -> dict[str, Version | None]:
    """Package -> the lowest version pyproject.toml allows (its `>=`, `==` or `~=` bound, the
    lowest where it is listed twice), or None when a listing has no floor at all."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    texts = list(project["project"]["dependencies"])
    for extra in project["project"].get("optional-dependencies", {}).values():
        texts += extra
    texts += project["build-system"]["requires"]
    lowest: dict[str, Version | None] = {}
    for text in texts:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        floor = min(bounds) if bounds else None
        if name in lowest:
            known = lowest[name]
            floor = None if floor is None or known is None else min(floor, known)
        lowest[name] = floor
    return lowest


def pip_audit(lock: Path) -> tuple[list[str], int, int]:
    """Run pip-audit on one lock: (findings, packages audited, packages skipped)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "pip_audit", "-r", str(lock), "--disable-pip",
             "--format", "json", "-o", out.name, "--progress-spinner", "off",
             "--timeout", str(PIP_AUDIT_TIMEOUT_S)],
            capture_output=True, text=True, check=False)
        try:
            report = json.loads(Path(out.name).read_text() or "{}")
        except ValueError:
            report = {}
    if not report:  # pip-audit itself failed: that is a failed audit, whatever the network
        error = (proc.stderr.strip().splitlines() or ["no report"])[-1]
        return [f"pip-audit failed (exit {proc.returncode}): {error}"], 0, 0
    return read_report(report)


def read_report(report: dict[str, list[dict[str, object]]]) -> tuple[list[str], int, int]:
    """pip-audit's JSON report: (findings, packages audited, packages skipped)."""
    findings, audited, skipped = [], 0, 0
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            skipped += 1
            continue
        audited += 1
        for vuln in dep.get("vulns", []):  # type: ignore[attr-defined]
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
            findings.append(f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    return findings, audited, skipped


def tracked(root: Path) -> tuple[list[str], int]:
    """The tracked advisories against the locks and the floors: (findings, advisories)."""
    data = tomllib.loads((root / "requirements" / "advisories.toml").read_text())
    advisories = data["advisory"]
    lowest = floors(root)
    findings = []
    for lock in (root / "requirements" / name for name in LOCK_NAMES):
        pins = locked(lock)
        for adv in advisories:
            for version in pins.get(canonicalize_name(adv["package"]), ()):
                if version < Version(adv["fixed"]):
                    findings.append(f"{lock.name}: {adv['package']} {version}: {adv['id']} "
                                    f"(fixed in {adv['fixed']}): {adv['summary']}")
    for adv in advisories:
        name = canonicalize_name(adv["package"])
        if name not in lowest:
            continue  # not a dependency pyproject.toml names: the locks decide
        floor = lowest[name]
        if floor is None:
            findings.append(f"pyproject.toml allows any {adv['package']}: {adv['id']} "
                            f"(fixed in {adv['fixed']}): give it a floor")
        elif floor < Version(adv["fixed"]):
            findings.append(f"pyproject.toml allows {adv['package']} {floor}: {adv['id']} "
                            f"(fixed in {adv['fixed']}): raise the floor")
    return findings, len(advisories)


def main(root: Path = ROOT) -> int:
    offline = os.environ.get("VEIL_AUDIT_OFFLINE") == "1"
    failed = False
    reached = False
    for lock in (root / "requirements" / name for name in LOCK_NAMES):
        findings, audited, skipped = pip_audit(lock)
        name = lock.relative_to(root)
        if audited and skipped:
            print(f"pip-audit {name}: only {audited} of {audited + skipped} packages could be "
                  "looked up: the audit is incomplete")
            failed = True
        elif audited:
            reached = True
            print(f"pip-audit {name}: {audited} packages, {len(findings)} known vulnerabilities")
        elif skipped:
            print(f"pip-audit {name}: no vulnerability database reachable from here "
                  f"(all {skipped} packages skipped)"
                  + ("; VEIL_AUDIT_OFFLINE=1 accepts that" if offline else
                     ": set VEIL_AUDIT_OFFLINE=1 if this machine cannot reach one"))
            failed |= not offline
        for finding in findings:
            print(f"  {finding}")
        failed |= bool(findings)
    findings, count = tracked(root)
    advisories = root / "requirements" / "advisories.toml"
    reviewed = tomllib.loads(advisories.read_text())["reviewed"]
    print(f"{advisories.relative_to(root)} (reviewed {reviewed}): {count} advisories against "
          f"both locks and pyproject's floors: {len(findings)} findings"
          + ("" if reached else "  <- the audit that ran here"))
    for finding in findings:
        print(f"  {finding}")
    failed |= bool(findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
