"""Test accuracy of each method on MNIST-1D with label noise, through the training app.

Methods: SGD (no SAM), SAM, ASAM, GSAM, LookSAM (k=5), SAM every 10 steps; label noise 0, 20 and
40% (of the training labels, replaced by a different random class); seeds 0, 1, 2; the app's
defaults otherwise (1-D CNN, SGD lr 0.1 with momentum, cosine, 30 epochs, batch 128). Prints a
markdown table of test accuracy (mean ± standard deviation over seeds) and wall time per run.

Usage: python benchmarks/variants_quality.py [--seeds 0 1 2 --noise 0 0.2 0.4 --epochs 30 --out FILE]
(about 25 minutes on 2 CPU cores with the defaults).
"""

import statistics
import time
from pathlib import Path

from _app import grid_parser, run_app

METHODS = {
    "SGD (no SAM)": ["sam=none"],
    "SAM, rho 0.05": ["sam=sam"],
    "ASAM, rho 0.5": ["sam=asam"],
    "GSAM, rho 0.05->0.01, alpha 0.1": ["sam=gsam"],
    "LookSAM, k 5, alpha 0.7": ["sam=looksam"],
    "SAM every 10 steps": ["sam=sam", "sam.interval=10"],
}


def main() -> None:
    parser = grid_parser(epochs=30)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    acc: dict[tuple[str, float], list[float]] = {}
    seconds: dict[str, list[float]] = {m: [] for m in args.methods}
    for noise in args.noise:
        for seed in args.seeds:
            for name in args.methods:
                start = time.perf_counter()
                result = run_app(
                    *METHODS[name], f"data.label_noise={noise}", f"seed={seed}", f"trainer.max_epochs={args.epochs}"
                )
                seconds[name].append(time.perf_counter() - start)
                acc.setdefault((name, noise), []).append(100 * result["test/acc"])
                print(f"{name:34s} noise {noise:.1f} seed {seed}: {100 * result['test/acc']:.1f}%", flush=True)

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {spread:.1f}"

    header = "| method | " + " | ".join(f"{int(100 * n)}% noise" for n in args.noise) + " | time per run |"
    lines = [header, "|---" * (len(args.noise) + 2) + "|"]
    for name in args.methods:
        cells = " | ".join(cell(acc[(name, n)]) for n in args.noise)
        lines.append(f"| {name} | {cells} | {statistics.mean(seconds[name]):.0f} s |")
    table = "\n".join(lines)
    print(f"\nMNIST-1D test accuracy (%), seeds {args.seeds}, {args.epochs} epochs\n\n{table}")
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
