"""scripts/audit.py: the tracked advisories catch a vulnerable lock and a floor inside an
affected range; a pip-audit report whose packages were all skipped is not a clean audit."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("veil_audit", ROOT / "scripts" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_copy(tmp_path: Path) -> Path:
    (tmp_path / "requirements").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for name in ("veil.lock", "test.lock", "advisories.toml"):
        shutil.copy(ROOT / "requirements" / name, tmp_path / "requirements")
    return tmp_path


def test_the_project_as_committed_has_no_tracked_finding() -> None:
    findings, count = load_audit().tracked(ROOT)
    assert count >= 10
    assert findings == []


def test_a_vulnerable_lock_and_a_low_floor_are_findings(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    lock = root / "requirements" / "veil.lock"
    text = lock.read_text()
    start = text.index("\nh2==") + 1
    version = text[start + 4 : text.index(" ", start)]
    lock.write_text(text.replace(f"h2=={version}", "h2==4.2.0"))
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"aiohttp>=3.14.1"', '"aiohttp>=3.12"')
                         .replace('"h11>=0.16.0"', '"h11"'))
    findings, _ = load_audit().tracked(root)
    assert any(f.startswith("veil.lock: h2 4.2.0: CVE-2026-71554") for f in findings), findings
    assert any(f.startswith("veil.lock: h2 4.2.0: CVE-2025-57804") for f in findings), findings
    assert any("pyproject.toml allows aiohttp 3.12: PYSEC-2026-2111" in f for f in findings)
    assert any("pyproject.toml allows any h11: CVE-2025-43859" in f for f in findings)


def test_a_report_that_looked_nothing_up_audited_nothing() -> None:
    audit = load_audit()
    skipped = {"dependencies": [
        {"name": "h2", "skip_reason": "Dependency not found on PyPI and could not be audited"},
        {"name": "h11", "skip_reason": "Dependency not found on PyPI and could not be audited"}]}
    assert audit.read_report(skipped) == ([], 0, 2)
    found = {"dependencies": [
        {"name": "h2", "version": "4.2.0", "vulns": [
            {"id": "GHSA-x", "fix_versions": ["4.4.1"]}]},
        {"name": "h11", "version": "0.16.0", "vulns": []}]}
    assert audit.read_report(found) == (["h2 4.2.0: GHSA-x (fixed in 4.4.1)"], 2, 0)
