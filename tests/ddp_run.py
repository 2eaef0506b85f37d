"""Trains SAMClassifier with real DDP (2 CPU processes, gloo) and saves what each rank ends with.

Run by tests/test_ddp.py as ``python tests/ddp_run.py OUT_DIR MODE``: Lightning's "ddp" strategy starts
the second process by running this script again, so it must not run under pytest itself.

MODE: ``local`` (each replica its own e), ``sync`` (sync_perturbation=True), ``accumulate``
(local, accumulate_grad_batches=2), ``syncbn`` (local, BatchNorm converted to SyncBatchNorm),
``accumulate_sync`` (sync_perturbation=True, accumulate_grad_batches=2),
``static`` (local, DDPStrategy(static_graph=True): expected to fail with a clear error),
``static_sync`` (static_graph=True with sync_perturbation=True: works),
``fsdp2`` (ModelParallelStrategy with fully_shard: e from the reduced gradient),
``manual`` / ``manual_sync`` (a manual-optimization module calling ``sam_step``, per-replica or synchronized e).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_sam import SAM, SharpnessMonitor, sam_step
from lightning_sam.manual import sam_step_stats
from tests.helpers import Classifier, SAMClassifier, make_loader

ALLREDUCES = 0


def counting_allreduce(state, bucket):
    global ALLREDUCES
    ALLREDUCES += 1
    return allreduce_hook(state, bucket)


class RecordSharpness(pl.Callback):
    """After SharpnessMonitor logged (it runs first): this rank's own figure and the logged one."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer._logger_connector.should_update_logs:
            logged = trainer.callback_metrics["sam/grad_norm"].item()
            self.rows.append((trainer.global_step, pl_module.sam_last_step.grad_norm.item(), logged))


class CountAllreduces(pl.Callback):
    def on_fit_start(self, trainer, pl_module):  # Lightning registers comm hooks on CUDA only
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)


class ShardedClassifier(SAMClassifier):
    def configure_model(self):
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch before 2.6: FSDP2 under its private path
            from torch.distributed._composable.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class ManualClassifier(Classifier):
    """Steps its optimizer itself, with sam_step."""

    def __init__(self, sync_perturbation: bool):
        super().__init__(batchnorm=False)
        self.automatic_optimization = False
        self.method, self.sync = SAM(0.05), sync_perturbation

    def training_step(self, batch, batch_idx):
        x, y = batch
        sam_step(self, self.optimizers(), lambda: F.cross_entropy(self(x), y), self.method, sync_perturbation=self.sync)

    @property
    def sam_last_step(self):  # what RecordSharpness reads
        return sam_step_stats(self)[0]


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0)
    if mode.startswith("manual"):
        model = ManualClassifier(sync_perturbation=mode == "manual_sync")
    else:
        model = (ShardedClassifier if mode == "fsdp2" else SAMClassifier)(
            sam=SAM(0.05),
            batchnorm=mode == "syncbn",
            sync_perturbation=mode in ("sync", "static_sync", "accumulate_sync"),
        )
    gpu = mode == "syncbn"  # SyncBatchNorm needs GPUs (benchmarks/gpu_checks.py runs it)
    strategy = DDPStrategy(
        process_group_backend="nccl" if gpu else "gloo", bucket_cap_mb=100, static_graph=mode.startswith("static")
    )
    if mode == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    record = RecordSharpness()
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        sync_batchnorm=mode == "syncbn",
        accumulate_grad_batches=2 if mode.startswith("accumulate") else 1,
        log_every_n_steps=2,
        callbacks=[SharpnessMonitor(), record]
        + ([] if mode in ("static", "static_sync", "fsdp2") else [CountAllreduces()]),
    )
    trainer.fit(model, make_loader(batch_size=8, n=64))
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    torch.save(
        {"state": state, "allreduces": ALLREDUCES, "steps": trainer.global_step, "sharpness": record.rows},
        out / f"rank{trainer.global_rank}.pt",
    )
    if torch.distributed.is_initialized():  # end the process group before exit: gloo's threads otherwise
        torch.distributed.barrier()  # may be torn down mid-flight ("terminate called without an active exception")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
