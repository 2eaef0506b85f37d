"""The speed benchmarks run end to end (a few steps each) and print the figures the README quotes.

They are smoke runs: the timings themselves are not asserted (this machine is shared and noisy).
"""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def ratio(output: str, label: str) -> float:
    match = re.search(re.escape(label) + r"\s+([0-9.]+)x", output)
    assert match, f"{label!r} not in the output:\n{output}"
    return float(match.group(1))


def test_step_overhead_prints_its_ratios_and_op_counts():
    out = run("step_overhead.py", "--repeats", "3")
    assert ratio(out, "ascent + restore / SGD step (wd)") > 0
    assert ratio(out, "per-parameter loop / ascent + restore") > 0
    ours = int(re.search(r"lightning_sam ascent \+ restore\s+(\d+) ATen ops", out).group(1))
    loop = int(re.search(r"per-parameter Python loop\s+(\d+) ATen ops", out).group(1))
    assert ours < 40 < 160 * 5 <= loop  # foreach: a handful of ops; the loop: several per tensor


def test_lightning_overhead_prints_its_ratios():
    out = run("lightning_overhead.py", "--steps", "3")
    assert ratio(out, "Lightning SAM / plain SAM loop") > 0
    assert ratio(out, "Lightning SAM / Lightning no SAM") > 0
    assert ratio(out, "manual + pytorch_optimizer.SAM / ours") > 0  # the recipe users write without us


def test_quality_report_tunes_on_validation_and_reports_its_targets(tmp_path):
    out = run("quality_report.py", "--quick", "--methods", "SGD", "--out", str(tmp_path / "q.md"))
    text = (tmp_path / "q.md").read_text()
    assert "Tuning (validation accuracy %" in text and "| SAM | rho " in text and "| SGD | lr " in text
    assert "Tuned SAM - tuned SGD at 40% noise" in text and text in out
