"""The speed benchmarks run end to end (a few steps each) and print the figures the README quotes.

They are smoke runs: the timings themselves are not asserted (this machine is shared and noisy).
"""

import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def figure(output: str, label: str, unit: str) -> float:
    """The number printed after ``label``, followed by ``unit``: a finite positive float."""
    match = re.search(re.escape(label) + r"\s+(\S+?)\s*" + re.escape(unit), output)
    assert match, f"{label!r} not in the output:\n{output}"
    value = float(match.group(1))  # 'nan' and 'inf' parse too
    assert math.isfinite(value) and value > 0, f"{label}: {match.group(1)}"
    return value


def ratio(output: str, label: str) -> float:
    return figure(output, label, "x")


def test_step_overhead_prints_its_ratios_and_op_counts():
    out = run("step_overhead.py", "--repeats", "3")
    sgd, sgd_no_wd, ours_ms, loop_ms = (
        figure(out, label, "ms")
        for label in (
            "SGD step (momentum 0.9, wd 5e-4, foreach)", "SGD step (momentum 0.9, no wd, foreach)",
            "lightning_sam ascent + restore", "per-parameter Python loop",
        )
    )  # fmt: skip
    # each ratio is the one its row names, of the medians printed above it (3 and 2 decimals)
    assert ratio(out, "ascent + restore / SGD step (wd)") == pytest.approx(ours_ms / sgd, rel=0.01, abs=0.006)
    assert ratio(out, "ascent + restore / SGD step (no wd)") == pytest.approx(ours_ms / sgd_no_wd, rel=0.01, abs=0.006)
    assert ratio(out, "per-parameter loop / ascent + restore") == pytest.approx(loop_ms / ours_ms, rel=0.01, abs=0.006)
    tensors = int(re.search(r"MLP: (\d+) tensors", out).group(1))
    ours = int(re.search(r"lightning_sam ascent \+ restore\s+(\d+) ATen ops", out).group(1))
    loop = int(re.search(r"per-parameter Python loop\s+(\d+) ATen ops", out).group(1))
    assert tensors == 160
    # foreach: a dozen dispatches for any number of tensors (12 today: _foreach_norm, stack, norm, add,
    # reciprocal, 3 mul, _foreach_copy_, .item(), _foreach_add_, _foreach_copy_), not several per tensor
    assert ours < 20
    # the loop: 7 per tensor (norm, .data, clone, mul, add_, .data, copy_) and 5 for the norm and scale
    assert loop == 7 * tensors + 5


def test_lightning_overhead_prints_its_ratios():
    out = run("lightning_overhead.py", "--steps", "3", "--rounds", "3")
    assert "batch 128, 3 steps interleaved" in out
    sam_ms, ref_ms = (
        figure(out, label, "ms/step") for label in ("Lightning + SAMLightningModule", "plain-PyTorch foreach SAM loop")
    )
    for label in ("Lightning, no SAM", "plain-PyTorch SGD loop, no SAM", "Lightning manual + pytorch_optimizer.SAM"):
        figure(out, label, "ms/step")
    sam_ratio = ratio(out, "Lightning SAM / plain SAM loop")
    rounds = re.search(r"median of rounds: ([^)]*)\)", out).group(1).split(", ")
    assert len(rounds) == 3 and all(r.endswith("x") for r in rounds), rounds
    assert sam_ratio == statistics.median(float(r[:-1]) for r in rounds)  # the median round's ratio...
    assert sam_ratio == pytest.approx(sam_ms / ref_ms, rel=0.01, abs=0.002)  # ...of the times printed for it
    ratio(out, "Lightning SAM / Lightning no SAM")
    ratio(out, "Lightning no SAM / plain SGD loop")
    ratio(out, "manual + pytorch_optimizer.SAM / ours")  # the recipe users write without us
    for name in ("MomentumSAM", "RWP"):  # the single-pass methods' cost over an ordinary step
        figure(out, f"Lightning + {name}", "ms/step")
        ratio(out, f"{name} / Lightning no SAM")


def test_frontier_tunes_measures_paired_seeds_and_reports_its_targets(tmp_path):
    out = run("frontier.py", "--quick", "--methods", "Momentum-SAM", "--out", str(tmp_path / "f.md"))
    text = (tmp_path / "f.md").read_text()
    assert text in out
    for title in ("**Best validation checkpoint**", "**Weights after the last epoch**"):
        assert title in text
    rows = re.findall(r"^\| (SGD|SAM|Momentum-SAM) \| (.*?) \|", text, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["SGD", "SAM", "Momentum-SAM"] * 2  # SGD and SAM always run
    assert all(r[1].startswith("lr ") for r in rows) and "rho " in rows[1][1]  # the settings under the app's names
    gains = re.findall(r"\| ([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\] \|", text)
    assert len(gains) == 4 and all(float(lo) <= float(m) <= float(hi) for m, lo, hi in gains)  # mean inside its CI
    assert "Tuned SAM over tuned SGD, paper's protocol:" in text
    assert "Momentum-SAM (weights after the last epoch)" in text
    assert re.search(r"an SGD run takes \d+ s: about \d+ min", out)  # the plan, printed first
    costs = re.findall(r"\| (\d+\.\d\d)x \|", text)
    assert len(costs) == 6 and all(float(c) > 0 for c in costs)
    seeds = re.search(r"^- Momentum-SAM: (.*)$", text.split("Per measurement seed")[1], flags=re.MULTILINE).group(1)
    assert re.fullmatch(r"\d+\.\d/\d+\.\d(, \d+\.\d/\d+\.\d)*", seeds)  # one pair per measurement seed
    tuning = text.split("Tuning (")[1]
    assert "confirmed on [101]" in text and all(f"- {m} (" in tuning for m in ("SGD", "SAM", "Momentum-SAM"))
    assert tuning.count(" [2]") >= 3  # each method's best, run on the second tuning seed too
