"""Trains with lightning_sam.fabric.sam_step under Fabric's DDP (2 CPU processes, gloo); saves what each rank ends with.

Run by tests/test_fabric.py as ``python tests/fabric_ddp_run.py OUT_DIR``: Fabric's "ddp" strategy starts the
second process by running this script again, so it must not run under pytest itself. Two runs in the same processes:
``local`` (each replica its own e) and ``sync`` (``sync_perturbation=True``), saved as ``{mode}_rank{r}.pt``.
The data order is tests/test_ddp.py's simulation's: a permutation of 64 examples with seed 0,
rank r taking every second one, 8 per batch, 4 steps.
"""

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_sam import SAM
from lightning_sam.fabric import sam_step
from tests.helpers import make_data, make_net

ALLREDUCES = 0


def counting_allreduce(state, bucket):
    global ALLREDUCES
    ALLREDUCES += 1
    return allreduce_hook(state, bucket)


def run(fabric: Fabric, out: Path, mode: str) -> None:
    global ALLREDUCES
    ALLREDUCES = 0
    net = make_net(batchnorm=False)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
    model._forward_module.register_comm_hook(None, counting_allreduce)  # DistributedDataParallel's
    x, y = make_data(n=64).tensors
    mine = torch.randperm(64, generator=torch.Generator().manual_seed(0))[fabric.global_rank :: 2]
    method = SAM(0.05)
    for b in range(4):
        i = mine[b * 8 : (b + 1) * 8]
        sam_step(fabric, model, optimizer, lambda i=i: F.cross_entropy(model(x[i]), y[i]), method,
                 sync_perturbation=mode == "sync")  # fmt: skip
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save({"state": state, "allreduces": ALLREDUCES}, out / f"{mode}_rank{fabric.global_rank}.pt")


class RunningMean(torch.nn.Module):
    """A forward that updates a buffer in place and uses it: DDP broadcasts rank 0's before each forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 3)
        self.register_buffer("mean", torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.5).add_(x.mean(0), alpha=0.5)
        return self.lin(x - self.mean)


def rho_0_is_plain_with_a_running_buffer(fabric: Fabric, out: Path) -> None:
    """SAM(rho=0) against a plain Fabric DDP loop: the perturbed pass starts from the broadcast buffers."""
    ends = []
    x, y = make_data(n=64).tensors
    mine = torch.randperm(64, generator=torch.Generator().manual_seed(0))[fabric.global_rank :: 2]
    for use_sam in (False, True):
        net = RunningMean()
        model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
        for b in range(4):
            i = mine[b * 8 : (b + 1) * 8]

            def loss(i: torch.Tensor = i, model: torch.nn.Module = model) -> torch.Tensor:
                return F.cross_entropy(model(x[i]), y[i])

            if use_sam:
                sam_step(fabric, model, optimizer, loss, SAM(0.0))
            else:
                optimizer.zero_grad()
                fabric.backward(loss())
                optimizer.step()
        ends.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    same = all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    torch.save({"same": same}, out / f"buffers_rank{fabric.global_rank}.pt")


if __name__ == "__main__":
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    for mode in ("local", "sync"):
        run(fabric, Path(sys.argv[1]), mode)
    rho_0_is_plain_with_a_running_buffer(fabric, Path(sys.argv[1]))
    # end the process group before exit: gloo's threads are otherwise torn down mid-flight at interpreter
    # shutdown, which aborts the process now and then ("terminate called without an active exception")
    fabric.barrier()
    torch.distributed.destroy_process_group()
