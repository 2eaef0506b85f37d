"""The checks that need a CUDA GPU, in one short script (the test suite runs on CPU).

1. 16-mixed with a real GradScaler: an fp16 overflow in the ascent pass is skipped, the weights
   stay finite and the scaler backs off; bf16-mixed trains.
2. The finite check on CUDA tensors of every floating dtype: inf/NaN found, large finite values
   (1e300 in float64, the float32 maximum) not flagged, mixed dtypes (fp32 gradients, bf16 losses).
3. SyncBatchNorm under 2-GPU DDP (only with 2+ GPUs).
4. Speed on the GPU: ascent + restore against the SGD step and a per-parameter loop
   (benchmarks/step_overhead.py), and the Lightning step against a plain loop
   (benchmarks/lightning_overhead.py).

Usage: python benchmarks/gpu_checks.py     (exits 0 with a line per check; 1 if a check fails)
"""

import copy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_sam import SAM  # noqa: E402
from tests.helpers import SAMClassifier, make_loader  # noqa: E402


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


def check_fp16_overflow() -> None:
    class Overflow(SAMClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 1e4 if self.trainer.global_step == 1 else loss

    model = Overflow(sam=SAM(0.05))
    t = trainer(max_steps=4, precision="16-mixed")
    t.fit(model, make_loader(batch_size=16))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(params).all(), "non-finite weights after an fp16 overflow"
    assert model.sam_skipped_steps >= 1 and t.precision_plugin.scaler.get_scale() < 65536.0
    print(f"ok  16-mixed: overflow skipped ({model.sam_skipped_steps} step), weights finite, scale backed off")


def check_bf16() -> None:
    model = SAMClassifier(sam=SAM(0.05))
    before = copy.deepcopy(model.net[0].weight.detach())
    trainer(max_epochs=2, precision="bf16-mixed").fit(model, make_loader(batch_size=16))
    assert not torch.equal(before, model.net[0].weight.detach().cpu())
    print(f"ok  bf16-mixed trains, eps_norm {model.sam_last_step.eps_norm.item():.4f}")


def check_finite_check() -> None:
    from lightning_sam.tensors import any_non_finite

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        big = {torch.float64: 1e300}.get(dtype, torch.finfo(dtype).max)
        tensors = [torch.randn(64, 64, device="cuda").to(dtype), torch.full((3,), big, dtype=dtype, device="cuda")]
        assert not any_non_finite(tensors).item(), f"{dtype}: a large finite value flagged"
        for bad in (float("nan"), float("inf"), -float("inf")):
            flagged = [t.clone() for t in tensors]
            flagged[0][5, 7] = bad
            assert any_non_finite(flagged).item(), f"{dtype}: {bad} missed"
            assert any_non_finite([torch.ones(8, device="cuda"), flagged[0].to(torch.bfloat16)]).item()
    print("ok  finite check on CUDA: fp16/bf16/fp32/fp64, mixed dtypes, large finite values")


def run(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True)
    print(result.stdout[-2500:])
    assert result.returncode == 0, result.stderr[-2000:]


if __name__ == "__main__":
    assert torch.cuda.is_available(), "no CUDA GPU"
    print(torch.cuda.get_device_name(), torch.__version__)
    check_fp16_overflow()
    check_bf16()
    check_finite_check()
    if torch.cuda.device_count() >= 2:
        result = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_run.py"), "/tmp", "syncbn"])
        assert result.returncode == 0
        print("ok  SyncBatchNorm under 2-GPU DDP")
    run("step_overhead.py", "--device", "cuda")
    run("lightning_overhead.py", "--device", "cuda", "--steps", "100")
