"""SAM in a plain PyTorch loop (no Lightning): ``lightning_sam.optim.SAM`` around any torch optimizer.

python examples/plain_loop.py

Three ways to call it: one call per step with a closure; davda54/sam's two calls around your own passes
(see examples/migrate_from_davda54.py); and a single-pass method (Momentum-SAM) whose ``step()`` needs no
closure: one forward and backward per step, the cost of SGD.
"""

import argparse

import torch
from torch.nn import functional as F

from lightning_sam import MomentumSAM
from lightning_sam.optim import SAM


def data(seed: int = 0, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    flipped = torch.rand(1024, generator=g) < noise
    return x, torch.where(flipped, 1 - y, y)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    epochs = parser.parse_args().epochs
    x, y = data(noise=0.2)  # 20% of the training labels flipped
    x_test, y_test = data(seed=1)

    # 1. two passes a step: SAM, one call per step with a closure (a forward and a backward, returning the loss)
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, module=model)
    for _epoch in range(epochs):
        for i in torch.randperm(1024).split(64):

            def closure(i=i):
                loss = F.cross_entropy(model(x[i]), y[i])
                loss.backward()
                return loss

            loss = optimizer.step(closure)  # the clean pass, w + e, the perturbed pass, w restored, the SGD step
            optimizer.zero_grad()
    stats = optimizer.last_step
    print(f"SAM: test accuracy {accuracy(model, x_test, y_test):.3f}, last loss {loss.item():.3f}, "
          f"sharpness {stats.sharpness.item():.4f}, skipped steps {optimizer.skipped_steps}")  # fmt: skip

    # 2. one pass a step: Momentum-SAM with step() and no closure. The forward and backward run at w + e;
    #    step() puts w back, steps, and moves to the next w + e. Evaluate inside unperturbed().
    model = make_model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, method=MomentumSAM(rho=0.5), lr=0.1, momentum=0.9)
    for _epoch in range(epochs):
        for i in torch.randperm(1024).split(64):
            F.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()
            optimizer.zero_grad()
        with optimizer.unperturbed():  # w here; w + e again after
            test = accuracy(model, x_test, y_test)
    optimizer.restore()  # training is over: w for good
    print(f"Momentum-SAM (one pass a step): test accuracy {test:.3f} = {accuracy(model, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
