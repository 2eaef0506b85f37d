"""The training app under faults, as a user meets them: real processes, kill -9, signals, a full disk.

Each run is a real ``python -m lightning_sam.train`` on the debug config with a few more batches,
so a run takes a few seconds; the uninterrupted reference run is shared.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _args(data_dir: Path, *extra: str) -> list[str]:
    return [
        "debug=default", f"data.data_dir={data_dir}", "trainer.max_epochs=3", "trainer.limit_train_batches=12",
        "trainer.limit_val_batches=2", "scheduler=none", *extra,
    ]  # fmt: skip


def _app(cwd: Path, args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_sam.train", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def _tested(stdout: str) -> tuple[str, str]:
    """(test accuracy, name of the tested checkpoint) from the app's summary."""
    line = next(x for x in stdout.splitlines() if x.startswith("test accuracy:"))
    accuracy, checkpoint = line.removeprefix("test accuracy: ").split(" (checkpoint: ")
    return accuracy, Path(checkpoint.rstrip(")")).name


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist1d_dir):
    root = tmp_path_factory.mktemp("whole")
    code, out, err = _finish(_app(root, _args(mnist1d_dir, f"hydra.run.dir={root / 'run'}")))
    assert code == 0, err[-3000:]
    return root / "run", out


def _resume_command(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    line = lines[next(i for i, x in enumerate(lines) if x.endswith("Resume with:")) + 1]
    command = line.split()
    assert command[:3] == ["python", "-m", "lightning_sam.train"]
    return command[3:]


def _assert_same_run(run: Path, out: str, reference: Path, reference_out: str) -> None:
    assert _tested(out) == _tested(reference_out)  # the same checkpoint tested, the same accuracy
    whole, resumed = _weights(reference), _weights(run)
    assert whole and whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert _rows(run) == _rows(reference)  # metrics.csv continued where it stopped, no row twice
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir()
    )


# The interrupted runs sleep after each batch (an epoch then takes over half a second), so that a signal sent
# after epoch 0's checkpoint lands in epoch 1 however fast the machine is; sleeping changes no result.
_SLOW = ("+callbacks.slow._target_=tests.app.fault_driver.SlowSteps",)
_WITH_TESTS = {"env": {**os.environ, "PYTHONPATH": str(ROOT)}}


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, mnist1d_dir, uninterrupted):
    run = tmp_path / "run"
    process = _app(tmp_path, _args(mnist1d_dir, f"hydra.run.dir={run}", *_SLOW), **_WITH_TESTS)
    _wait_for(run / "checkpoints" / "last.ckpt", process)  # epoch 0 is over
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)  # in the middle of epoch 1
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not list((run / "checkpoints").glob(".*.tmp"))  # or any partial file under a valid name
    ckpt = run / "checkpoints" / "last.ckpt"
    code, out, err = _finish(_app(tmp_path, _args(mnist1d_dir, f"ckpt_path={ckpt}", *_SLOW), **_WITH_TESTS))
    assert code == 0, err[-3000:]
    noise = [x for x in err.splitlines() if "won't be reloaded" in x or "exists and is not empty" in x]
    assert not noise
    _assert_same_run(run, out, *uninterrupted)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("config.yaml"))


def test_sigterm_prints_the_resume_command_which_finishes_the_run(tmp_path, mnist1d_dir, uninterrupted):
    run = tmp_path / "run"
    process = _app(tmp_path, _args(mnist1d_dir, f"hydra.run.dir={run}", *_SLOW), **_WITH_TESTS)
    _wait_for(run / "checkpoints" / "last.ckpt", process)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)  # what SLURM sends before a time limit
    code, _, err = _finish(process)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM. Resume with:" in err
    command = _resume_command(err)
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in command
    code, out, err = _finish(_app(tmp_path, command, **_WITH_TESTS))
    assert code == 0, err[-3000:]
    _assert_same_run(run, out, *uninterrupted)


def test_two_runs_started_together_get_their_own_directories(tmp_path, mnist1d_dir):
    first, second = (_app(tmp_path, _args(mnist1d_dir, "trainer.max_epochs=1", f"seed={s}")) for s in (0, 1))
    results = [_finish(p) for p in (first, second)]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    runs = sorted((tmp_path / "outputs" / "debug").iterdir())
    assert len(runs) == 2
    seeds = sorted((r / ".hydra" / "overrides.yaml").read_text().count("seed=1") for r in runs)
    assert seeds == [0, 1]  # each directory holds its own run's config


def test_the_same_explicit_directory_is_refused_to_a_second_run(tmp_path, mnist1d_dir):
    run = tmp_path / "run"
    first = _app(tmp_path, _args(mnist1d_dir, f"hydra.run.dir={run}", "seed=0"))
    end = time.monotonic() + 120
    while not ((run / ".run.lock").exists() and (run / ".run.lock").read_text()):  # the holder is written once locked
        assert first.poll() is None and time.monotonic() < end, first.communicate()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # the first run holds the lock however long the second takes to start
    try:
        code, _, err = _finish(_app(tmp_path, _args(mnist1d_dir, f"hydra.run.dir={run}", "seed=1")))
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2 and "is in use by another run" in err and err.count("\n") == 1
    assert _finish(first)[0] == 0
    assert "seed=1" not in (run / ".hydra" / "overrides.yaml").read_text()
    config = (run / ".hydra" / "config.yaml").read_text()
    code, _, err = _finish(_app(tmp_path, _args(mnist1d_dir, f"hydra.run.dir={run}", "seed=1", "model.channels=7")))
    assert code == 2 and "already holds the checkpoints of another run" in err
    assert (run / ".hydra" / "config.yaml").read_text() == config  # the finished run's config is put back
    assert "seed=1" not in (run / ".hydra" / "overrides.yaml").read_text()


def test_a_full_disk_leaves_no_truncated_checkpoint(tmp_path, mnist1d_dir):
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "tests" / "app" / "fault_driver.py"), "4", *_args(mnist1d_dir)]
    result = subprocess.run([*command, f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: no space left on device" in result.stderr and "Traceback" not in result.stderr
    files = sorted((run / "checkpoints").iterdir())
    assert files and not [f for f in files if f.name.startswith(".")]  # the partial file was removed
    for f in files:
        torch.load(f, map_location="cpu", weights_only=True)  # every file under a valid name loads
        assert f.stat().st_mode & 0o644 == 0o644  # readable as an ordinary file (not mkstemp's 0600)
    assert "last.ckpt" in [f.name for f in files]


def test_a_config_error_is_one_line_exit_2_and_leaves_no_directory(tmp_path, mnist1d_dir):
    run = tmp_path / "run"
    code, _, err = _finish(_app(tmp_path, _args(mnist1d_dir, "sam.rho=-1", f"hydra.run.dir={run}")))
    assert code == 2
    assert err.strip().splitlines() == [
        "error: Invalid `sam` config: Expected `sam.rho` to be a finite, non-negative float, got -1."
    ]
    assert not run.exists()
    code, _, err = _finish(
        _app(tmp_path, _args(mnist1d_dir, "sam.rho=-1"), env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    )
    assert code != 0 and "Traceback" in err
