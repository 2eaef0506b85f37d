"""Runs the training app with a disk that fills up at the N-th checkpoint (tests/test_app_faults.py).

Usage: python tests/app/fault_driver.py N [app overrides...]. The N-th torch.save into a file writes
half of the bytes and raises OSError(ENOSPC), as a full disk does.
"""

import errno
import io
import sys
import time

import lightning.pytorch as pl
import torch


class SlowSteps(pl.Callback):
    """Sleeps after each training batch, so a signal sent between two checkpoints lands inside the run.

    Used as ``+callbacks.slow._target_=tests.app.fault_driver.SlowSteps``; it changes no result.
    """

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


def filling_disk_save(fail_at: int):
    """torch.save that writes half and raises ENOSPC at its fail_at-th write into a file."""
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        if not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        calls[0] += 1
        if calls[0] < fail_at:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


if __name__ == "__main__":
    torch.save = filling_disk_save(int(sys.argv.pop(1)))
    from lightning_sam.train import main

    main()
