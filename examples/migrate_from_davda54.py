"""A loop written for davda54/sam's ``sam.py`` (the README's loop), running on lightning-sam with one import changed.

python examples/migrate_from_davda54.py

    from sam import SAM                  # before
    from lightning_sam.optim import SAM  # after

The calls stay: ``SAM(params, base_optimizer, rho=..., adaptive=..., **kwargs)``, ``first_step(zero_grad=True)``,
``second_step(zero_grad=True)``, ``step(closure)``, ``base_optimizer`` (for a learning-rate scheduler). What
changes on purpose: ``w`` comes back from a saved copy (bit for bit), a non-finite loss or gradient skips the
update instead of writing NaN into the weights, and ``state_dict()`` carries the base optimizer's momentum.
"""

import argparse

import torch
from torch.nn import functional as F

from lightning_sam.optim import SAM  # was: from sam import SAM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    epochs = parser.parse_args().epochs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 2))  # fmt: skip

    base_optimizer = torch.optim.SGD  # davda54's README, as written there
    optimizer = SAM(model.parameters(), base_optimizer, rho=2.0, adaptive=True, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer.base_optimizer, step_size=5, gamma=0.5)

    for epoch in range(epochs):
        model.train()
        for i in torch.randperm(512).split(64):
            # first forward-backward pass
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            optimizer.first_step(zero_grad=True)

            # second forward-backward pass
            F.cross_entropy(model(x[i]), y[i]).backward()  # make sure to do a full forward pass
            optimizer.second_step(zero_grad=True)
        scheduler.step()
        print(f"epoch {epoch}: loss {loss.item():.3f}, lr {scheduler.get_last_lr()[0]:.3f}")


if __name__ == "__main__":
    main()
