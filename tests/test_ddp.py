"""Real DDP: two CPU processes with gloo (tests/ddp_run.py), against one-process simulations."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from lightning_sam import SAM
from tests.helpers import SAMClassifier, make_data, make_loader, make_net, trainer

ROOT = Path(__file__).resolve().parents[1]
RHO = 0.05


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(tmp_path), mode],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _grads(net, x, y, scale=1.0):
    net.zero_grad()
    (F.cross_entropy(net(x), y) * scale).backward()
    return [p.grad.clone() for p in net.parameters()]


def _perturbed(net, grads):
    replica = copy.deepcopy(net)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(replica.parameters(), grads):
            p.add_(RHO * g / (norm + 1e-12))
    return replica


def _simulate(mode: str) -> torch.nn.Module:
    """Two replicas in one process. Lightning's DistributedSampler shuffles with seed 0; rank r takes
    every second index of that order, 8 per batch. "local": each replica's e from its own gradient;
    "sync": one e from the averaged gradient; "accumulate": local, two micro-batches per update."""
    net = make_net(batchnorm=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = make_data(n=64).tensors
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    batches = [[order[r::2][b * 8 : (b + 1) * 8] for r in (0, 1)] for b in range(4)]
    micro = 2 if mode.startswith("accumulate") else 1
    for start in range(0, 4, micro):
        descent = [torch.zeros_like(p) for p in net.parameters()]
        for per_rank in batches[start : start + micro]:
            clean = [_grads(net, x[i], y[i]) for i in per_rank]
            if mode in ("sync", "accumulate_sync"):
                mean = [(a + b) / 2 for a, b in zip(*clean)]
                clean = [mean, mean]
            for i, g in zip(per_rank, clean):
                for d, pg in zip(descent, _grads(_perturbed(net, g), x[i], y[i], scale=1 / micro)):
                    d += pg / 2  # DDP averages over the two replicas
        for p, d in zip(net.parameters(), descent):
            p.grad = d
        opt.step()
    return net


@pytest.mark.parametrize(
    ("mode", "allreduces"),
    [
        ("local", 4),
        ("sync", 8),
        ("accumulate", 2),
        ("accumulate_sync", 4),
        ("static_sync", None),
        ("fsdp2", None),
        ("manual", 4),
        ("manual_sync", 8),
    ],
    ids=[
        "each-replica-its-own-e",
        "synchronized-e",
        "accumulation",
        "accumulation-synchronized-e",
        "static-graph-synchronized-e",
        "fsdp2",
        "sam-step-each-replica-its-own-e",
        "sam-step-synchronized-e",
    ],
)
def test_ddp_matches_simulation_with_the_expected_allreduces(tmp_path, mode, allreduces):
    if mode == "fsdp2" and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6):
        pytest.skip("FSDP2 on CPU processes needs torch >= 2.6 (public fully_shard; 2.4's calls CUDA)")
    result = _run(tmp_path, mode)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    accumulating = mode.startswith("accumulate")
    assert ranks[0]["steps"] == ranks[1]["steps"] == (2 if accumulating else 4)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # both replicas end identical
    if allreduces is not None:  # one gradient bucket: one all-reduce per synchronized backward
        assert ranks[0]["allreduces"] == allreduces
    # sam/* are logged on logging steps only (every 2nd here), as the mean over the ranks
    rows = [ranks[r]["sharpness"] for r in (0, 1)]
    for r in (0, 1):  # both ranks recorded every logging step, so the zip below compares them all
        assert [step for step, *_ in rows[r]] == ([1, 2] if accumulating else [2, 4]), r
    for (_, own0, logged0), (_, own1, logged1) in zip(*rows):
        assert logged0 == pytest.approx((own0 + own1) / 2, rel=1e-5) == pytest.approx(logged1, rel=1e-5)
    # FSDP2 reduce-scatters every backward, so e comes from the averaged gradient
    simulated = {"fsdp2": "sync", "static_sync": "sync", "manual": "local", "manual_sync": "sync"}
    expected = _simulate(simulated.get(mode, mode)).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(ranks[0]["state"]["net." + key], value, atol=1e-6, rtol=0, msg=key)
    # the modes really differ
    if mode == "sync":
        local = _simulate("local").state_dict()
        assert not torch.allclose(local["0.weight"], expected["0.weight"], atol=1e-6)


def test_static_graph_with_per_replica_eps_is_refused_before_training(tmp_path):
    result = _run(tmp_path, "static")
    assert result.returncode != 0
    assert "`DDPStrategy(static_graph=True)` cannot skip the all-reduce of SAM's ascent backward" in result.stderr
    assert "sync_perturbation=True" in result.stderr


def test_fsdp_v1_is_refused_with_a_pointer_to_fsdp2():
    # FSDPStrategy needs a GPU to build a Trainer; the check only looks at the strategy's type
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    fake = SimpleNamespace(gradient_clip_val=None, accumulate_grad_batches=1, strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"cannot run under FSDPStrategy.*FSDP2.*ModelParallelStrategy"):
        SAMClassifier()._sam_check_trainer(fake)


def test_strategies_that_accumulate_in_their_own_engine_are_refused():
    # DeepSpeed is not installed here; what the check looks at is the strategy's own flag
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    class EngineStrategy(SingleDeviceStrategy):
        handles_gradient_accumulation = True

    fake = SimpleNamespace(strategy=EngineStrategy("cpu"), accumulate_grad_batches=1, callbacks=[])
    with pytest.raises(ValueError, match=r"cannot run under EngineStrategy.*its own engine.*Use DDP"):
        SAMClassifier()._sam_check_trainer(fake)


def test_sync_batchnorm_statistics_are_updated_by_the_clean_pass_only():
    # SyncBatchNorm needs GPUs to synchronize; in one process it runs as BatchNorm, which checks that its
    # buffers come back as the clean pass left them. The 2-GPU run is in benchmarks/gpu_checks.py.

    model = SAMClassifier(sam=SAM(0.5))
    model.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.net)
    bn = model.net[1]
    expected, first = copy.deepcopy(bn), copy.deepcopy(model.net[0])
    loader = make_loader(batch_size=16, n=16)
    trainer(max_steps=1).fit(model, loader)
    x, _ = next(iter(loader))
    torch.nn.functional.batch_norm(
        first(x), expected.running_mean, expected.running_var, training=True, momentum=expected.momentum
    )
    torch.testing.assert_close(bn.running_mean, expected.running_mean)
    torch.testing.assert_close(bn.running_var, expected.running_var)
    assert bn.num_batches_tracked.item() == 1


def test_command_line_ddp_on_cpu(tmp_path, mnist1d_dir):
    result = subprocess.run(
        [
            sys.executable, "-m", "lightning_sam.train", "trainer=ddp_cpu",
            "trainer.devices=2", "debug=default", f"data.data_dir={mnist1d_dir}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy:" in result.stdout
    assert (tmp_path / "run" / "metrics.csv").exists()
