"""What keeps a run's directory safe (lightning_sam.app.runs), on its own: atomic checkpoints, the lock, the CSV
log that resumes, signals turned into an exception, and what counts as a full disk."""

import errno
import os
import signal

import pytest
import torch

from lightning_sam.app.runs import (
    AtomicCheckpointIO,
    Interrupted,
    RunCSVLogger,
    RunLock,
    is_disk_full,
    raise_on_signals,
)


def test_a_failed_checkpoint_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as an ordinary file (mkstemp's would be 0600)

    def failing_save(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    with pytest.raises(TypeError, match="`storage_options` is not supported"):
        io.save_checkpoint({}, path, storage_options={"a": 1})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text().endswith(f":{os.getpid()}")
        with (
            pytest.raises(RuntimeError, match=rf"{tmp_path} is in use by another run \(.*:{os.getpid()}\)"),
            RunLock(tmp_path),
        ):
            pass
    assert lock.path.read_text() == ""  # released and emptied
    with RunLock(tmp_path):  # free again
        pass


def test_the_csv_log_continues_from_the_checkpoint_step(tmp_path):
    first = RunCSVLogger(tmp_path, name="", version="")
    for step in range(4):
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    resumed = RunCSVLogger(tmp_path, resume_step=2, name="", version="")
    resumed.log_metrics({"loss": 20.0}, step=2)
    resumed.save()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows == ["loss,step", "0.0,0", "1.0,1", "20.0,2"]  # rows from step 2 on were dropped, then logged again
    fresh = RunCSVLogger(tmp_path, name="", version="")  # a new run (no resume_step) starts the file afresh
    fresh.log_metrics({"loss": 7.0}, step=0)
    fresh.save()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["loss,step", "7.0,0"]


def test_signals_become_an_exception_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="interrupted by SIGTERM") as caught, raise_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
    assert caught.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_full_disk_is_recognized_through_causes():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as err:
            raise RuntimeError("checkpointing failed") from err
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("no"))
