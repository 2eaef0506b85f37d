"""What SAM's ascent and restore cost next to the base optimizer's own step.

On a 2.6M-parameter MLP of 160 tensors (80 Linear layers), times, interleaved and repeated:

* the base optimizer step: SGD, momentum 0.9, foreach, with weight decay 5e-4 (the paper's optimizer)
  and without;
* lightning_sam's ascent + restore: ||g||, e = rho g / ||g||, save w, w <- w + e, w <- saved w;
* the same done by a per-parameter Python loop (davda54/sam's style).

Prints medians and the two ratios, and how many ATen operations each variant dispatches per call:
on a GPU every one of them is at least one kernel launch (a few microseconds each), which is what
a per-parameter loop pays for there; on a CPU both variants are bound by memory traffic instead.
Usage: python benchmarks/step_overhead.py [--repeats 200]
"""

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_sam import SAM, ParamGroup, WeightBackup


def mlp(width: int = 180, layers: int = 80) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def per_parameter_loop(params: list[torch.Tensor], rho: float, state: dict) -> None:
    """SAM's first and second step as a Python loop over parameters."""
    grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
    scale = rho / (grad_norm + 1e-12)
    with torch.no_grad():
        for p in params:
            state[p] = p.data.clone()
            p.add_(p.grad * scale)
        for p in params:
            p.data.copy_(state[p])


class CountOps(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the block (a foreach op counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_call(fn) -> int:
    with CountOps() as counter:
        fn()
    return counter.count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the process's CPU time, less sensitive to other load on a shared machine",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base_clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def clock() -> float:
        sync()
        return base_clock()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = mlp().to(device)
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, foreach=True)
    sgd_no_wd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    sam, backup, state = SAM(0.05), WeightBackup(), {}
    group = [ParamGroup(0.05, params, [p.grad for p in params])]

    def sam_ascent_restore() -> None:
        backup.perturb_(group, sam.ascent_(group).scales)
        backup.restore_()

    candidates = {
        "SGD step (momentum 0.9, wd 5e-4, foreach)": sgd.step,
        "SGD step (momentum 0.9, no wd, foreach)": sgd_no_wd.step,
        "lightning_sam ascent + restore": sam_ascent_restore,
        "per-parameter Python loop": lambda: per_parameter_loop(params, 0.05, state),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(10):  # warm-up, buffers allocated
        for fn in candidates.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            start = clock()
            fn()
            times[name].append(clock() - start)

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"MLP: {len(params)} tensors, {n / 1e6:.2f}M parameters; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {device}; {args.clock} clock, "
        f"median of {args.repeats} interleaved repeats\n"
    )
    for k, v in med.items():
        print(f"  {k:<42s} {v:8.3f} ms")
    print()
    for k in ("lightning_sam ascent + restore", "per-parameter Python loop"):
        print(f"  {k:<42s} {ops_per_call(candidates[k]):5d} ATen ops per call")
    base, base_no_wd, ours, loop = med.values()
    print(f"\n  ascent + restore / SGD step (wd)       {ours / base:6.2f}x   (target <= 1.0x)")
    print(f"  ascent + restore / SGD step (no wd)    {ours / base_no_wd:6.2f}x")
    print(f"  per-parameter loop / ascent + restore  {loop / ours:6.2f}x   (target >= 3x)")
    print(
        f"\n  extra memory: one saved copy of the perturbed weights = {4 * n / 2**20:.1f} MiB "
        f"(1.00x the parameters);\n  e is never stored: its direction stays in the gradients "
        "(ASAM: T^2 g, written in place)"
    )


if __name__ == "__main__":
    main()
