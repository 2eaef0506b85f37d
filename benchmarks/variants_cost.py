"""Cost per step of each method against plain training, in a Lightning Trainer.

Same model and data as benchmarks/lightning_overhead.py (a 2.6M-parameter MLP, batch 128, SGD). Each
method's Lightning run is interleaved step by step with the same plain-PyTorch SAM loop (see
lightning_overhead.py), which cancels this shared machine's swings; a method's cost relative to
plain training is its ratio to that reference divided by plain training's. Medians over 40 steps,
which hold 8 LookSAM (k=5) and 4 SAM-every-10 SAM steps.

Usage: python benchmarks/variants_cost.py [--steps 40]
"""

import argparse
import copy

import lightning_overhead as lo
import torch

from lightning_sam import ASAM, GSAM, SAM, LookSAM

METHODS = {
    "plain (no SAM)": None,
    "SAM": SAM(0.05),
    "ASAM": ASAM(0.5),
    "GSAM": GSAM(0.05, alpha=0.1),
    "LookSAM, k=5": LookSAM(0.05, k=5),
    "SAM every 10 steps": SAM(0.05, interval=10),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    loader = lo.make_loader(args.steps, args.batch_size)
    net = lo.mlp()
    ratios = {}
    for name, method in METHODS.items():
        module = lo.Plain(copy.deepcopy(net)) if method is None else lo.WithSAM(copy.deepcopy(net), sam=method)
        # median over steps would pick one kind of step for the mixed methods: use the mean there
        timer_ratio = lo.interleaved_ratio(module, net, loader, average="mean")
        ratios[name] = timer_ratio[2]
    plain, sam = ratios["plain (no SAM)"], ratios["SAM"]
    print(
        f"MLP 2.6M parameters, batch {args.batch_size}, {args.steps} steps per method, "
        f"each interleaved with a plain SAM loop; torch {torch.__version__}\n"
    )
    print("| method | cost / plain training | cost / SAM |\n|---|---|---|")
    for name, ratio in ratios.items():
        print(f"| {name} | {ratio / plain:.2f}x | {ratio / sam:.2f}x |")
    print("\ntargets: SAM about 2x plain; LookSAM k=5 at most 0.7x SAM; SAM every 10 steps about 1.1x plain")


if __name__ == "__main__":
    main()
