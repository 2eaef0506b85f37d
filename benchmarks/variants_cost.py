"""Cost per step of each method against plain training, in a Lightning Trainer, one run.

Same model and data as benchmarks/lightning_overhead.py (a 2.6M-parameter MLP, batch 128, SGD);
rounds alternate between the methods; per-step times (process CPU time by default) are medians
over rounds of 20 timed steps each, which hold 4 LookSAM (k=5) and 2 SAM-every-10 SAM steps.

Usage: python benchmarks/variants_cost.py [--rounds 3 --clock cpu|wall]
"""

import argparse
import copy
import statistics
import time

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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    args = parser.parse_args()
    lo.CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    n = (args.steps + lo.WARMUP) * 128
    data = torch.utils.data.TensorDataset(torch.randn(n, 180), torch.randn(n, 180))
    loader = torch.utils.data.DataLoader(data, batch_size=128)
    net = lo.mlp()
    times: dict[str, list[float]] = {k: [] for k in METHODS}
    for _ in range(args.rounds):
        for name, method in METHODS.items():
            module = lo.Plain(copy.deepcopy(net)) if method is None else lo.WithSAM(copy.deepcopy(net), sam=method)
            times[name].append(lo.lightning_step_time(module, loader))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    plain, sam = med["plain (no SAM)"], med["SAM"]
    print(f"MLP 2.6M parameters, batch 128, {args.steps} timed steps x {args.rounds} rounds, {args.clock} clock\n")
    print("| method | ms/step | / plain | / SAM |\n|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / plain:.2f}x | {v / sam:.2f}x |")
    print("\ntargets: SAM about 2x plain; LookSAM k=5 at most 0.7x SAM; SAM every 10 steps about 1.1x plain")


if __name__ == "__main__":
    main()
