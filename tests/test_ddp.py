import copy
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from tests.helpers import make_data, make_net

ROOT = Path(__file__).resolve().parents[1]


def _simulate_two_replicas(rho: float, steps: int) -> torch.nn.Module:
    """One process: each replica its own e from its own half of the batch; descent gradients averaged."""
    net = make_net(batchnorm=False)
    replicas = [copy.deepcopy(net) for _ in range(2)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = make_data(n=64).tensors
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))  # DistributedSampler(shuffle, seed=0)
    for step in range(steps):
        descent = [torch.zeros_like(p) for p in net.parameters()]
        for rank, replica in enumerate(replicas):
            replica.load_state_dict(net.state_dict())
            idx = order[rank::2][step * 8 : (step + 1) * 8]
            replica.zero_grad()
            F.cross_entropy(replica(x[idx]), y[idx]).backward()
            grads = [p.grad for p in replica.parameters()]
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            with torch.no_grad():
                for p, g in zip(replica.parameters(), grads):
                    p.add_(rho * g / (norm + 1e-12))
            replica.zero_grad()
            F.cross_entropy(replica(x[idx]), y[idx]).backward()
            for d, p in zip(descent, replica.parameters()):
                d += p.grad / 2
        for p, d in zip(net.parameters(), descent):
            p.grad = d
        opt.step()
    return net


def test_ddp_default_each_replica_its_own_eps_and_one_allreduce_per_step(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    for key, value in ranks[0]["net"].items():
        assert torch.equal(value, ranks[1]["net"][key]), key  # both replicas end identical
    assert ranks[0]["allreduces"] == 4  # one bucket, one all-reduce per step: the ascent does not sync
    expected = _simulate_two_replicas(rho=0.05, steps=4)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(ranks[0]["net"][key], value, atol=1e-6, rtol=0, msg=key)
