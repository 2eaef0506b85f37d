"""SAM in a Lightning Fabric loop: ``lightning_sam.fabric.sam_step``, one call per training step.

python examples/fabric_loop.py                  # one CPU process
python examples/fabric_loop.py --devices 2      # DDP over 2 CPU processes (gloo): each replica its own e

Fabric's precision (``--precision bf16-mixed``; 16-mixed with its GradScaler on GPUs) and strategies apply to
both passes. A checkpoint: ``fabric.save`` of the model, the optimizer and ``method.state_dict()`` (Fabric refuses
a frozen dataclass such as the method itself); after ``fabric.load``, hand that back to ``method.load_state_dict``.
"""

import argparse

import torch
from lightning.fabric import Fabric
from torch.nn import functional as F

from lightning_sam import SAM
from lightning_sam.fabric import sam_step, sam_step_stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=args.devices, precision=args.precision,
                    strategy="ddp" if args.devices > 1 else "auto")  # fmt: skip
    fabric.launch()
    fabric.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 10, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, :3].sum(1) > 0).long())
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data, batch_size=64, shuffle=True))
    net = torch.nn.Sequential(
        torch.nn.Linear(10, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 2)
    )
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    method = SAM(rho=0.05)  # one object for the whole run

    for epoch in range(args.epochs):
        for xb, yb in loader:
            loss = sam_step(fabric, model, optimizer, lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb), method)
        stats = sam_step_stats(optimizer)
        fabric.print(f"epoch {epoch}: loss {loss.item():.3f}, sharpness {stats.sharpness.item():.4f}, "
                     f"||e|| {stats.eps_norm.item():.3f}")  # fmt: skip
    fabric.save("fabric_sam.ckpt", {"model": model, "optimizer": optimizer, "sam": method.state_dict()})
    if torch.distributed.is_initialized():  # several processes: end the process group before they exit
        fabric.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
