"""Trains SAMClassifier with real DDP (2 CPU processes, gloo) and saves what each rank ends with.

Run by tests/test_ddp.py as ``python tests/ddp_run.py OUT_DIR``: Lightning's "ddp" strategy starts the
second process by running this script again, so it must not run under pytest itself.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_sam import SAM
from tests.helpers import SAMClassifier, make_loader

ALLREDUCES = 0


def counting_allreduce(state, bucket):
    global ALLREDUCES
    ALLREDUCES += 1
    return allreduce_hook(state, bucket)


def main(out: Path) -> None:
    pl.seed_everything(0)
    model = SAMClassifier(sam=SAM(0.05), batchnorm=False)
    strategy = DDPStrategy(process_group_backend="gloo", bucket_cap_mb=100)

    class CountAllreduces(pl.Callback):
        def on_fit_start(self, trainer, pl_module):  # Lightning registers comm hooks on CUDA only
            trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CountAllreduces()],
    )
    trainer.fit(model, make_loader(batch_size=8, n=64))
    torch.save(
        {"net": model.net.state_dict(), "allreduces": ALLREDUCES, "steps": trainer.global_step},
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
