"""Does SAM find flatter minima that generalize better? The measured-results report.

Trains, with the training app's MNIST-1D setup (1-D CNN, SGD lr 0.1 with momentum 0.9, weight
decay 5e-4, cosine schedule, batch 128, 30 epochs):

* SGD; SGD for twice the epochs (the same compute as SAM); SAM (rho 0.05); ASAM (rho 0.5, eta 0.01)
* at 0%, 20% and 40% label noise (training labels replaced by a different random class), seeds 0-2,

and reports test accuracy (mean ± standard deviation), the top Hessian eigenvalue of the training
loss at the end of training (HessianMonitor: the first two training batches, eval mode) and wall
time, as a markdown table and a plot.

Usage: python benchmarks/generalization.py [--out report.md --plot report.png] (about 25 min on 2
CPU cores); --quick runs a tiny version (one seed, one noise level, a few batches) in seconds.
"""

import statistics
import time
from pathlib import Path

from _app import grid_parser, mean_sd, run_app

EPOCHS = 30
METHODS = {
    "SGD": ["sam=none"],
    "SGD, 2x epochs": ["sam=none", "trainer.max_epochs={twice}"],
    "SAM": ["sam=sam"],
    "ASAM": ["sam=asam"],
}


def run(method: str, noise: float, seed: int, epochs: int, extra: list[str]) -> dict:
    overrides = [o.format(twice=2 * epochs) for o in METHODS[method]]
    start = time.perf_counter()
    result = run_app(
        f"trainer.max_epochs={epochs}",
        *extra,
        *overrides,  # after the epochs: "2x epochs" overrides them
        f"data.label_noise={noise}",
        f"seed={seed}",
        "callbacks=hessian",
        "callbacks.hessian.every_n_epochs=1000000",  # measured once, after the last epoch
    )
    return {
        "acc": 100 * result["test/acc"],
        "eig": result["metrics"].get("sharpness/hessian_max_eig", float("nan")),
        "seconds": time.perf_counter() - start,
    }


def table(results: dict, noises: list[float]) -> str:
    head = "| method | " + " | ".join(f"test acc. {int(100 * n)}% noise | top Hessian eig." for n in noises)
    lines = [head + " | time per run |", "|---" * (2 * len(noises) + 2) + "|"]
    for method in METHODS:
        cells = []
        for n in noises:
            runs = results[(method, n)]
            cells += [mean_sd([r["acc"] for r in runs]), mean_sd([r["eig"] for r in runs])]
        seconds = statistics.mean(r["seconds"] for n in noises for r in results[(method, n)])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.0f} s |")
    return "\n".join(lines)


def plot(results: dict, noises: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        xs = [100 * n for n in noises]
        for ax, key in ((left, "acc"), (right, "eig")):
            means = [statistics.mean(r[key] for r in results[(method, n)]) for n in noises]
            ax.plot(xs, means, marker="o", label=method)
    left.set(xlabel="label noise (%)", ylabel="test accuracy (%)", title="MNIST-1D test accuracy")
    right.set(xlabel="label noise (%)", ylabel="top Hessian eigenvalue", title="sharpness at the end of training")
    right.set_yscale("log")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = grid_parser(epochs=EPOCHS)
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--plot", type=Path, help="write the plot (PNG) here")
    parser.add_argument("--quick", action="store_true", help="one seed, 20%% noise, 1 epoch of 5 batches")
    args = parser.parse_args(argv)
    extra: list[str] = []
    if args.quick:
        args.seeds, args.noise, args.epochs = [0], [0.2], 1
        extra = ["trainer.limit_train_batches=5", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    start = time.perf_counter()
    results = {}
    for noise in args.noise:
        for seed in args.seeds:
            for method in METHODS:
                r = run(method, noise, seed, args.epochs, extra)
                results.setdefault((method, noise), []).append(r)
                print(f"{method:16s} noise {noise:.1f} seed {seed}: {r['acc']:.1f}% eig {r['eig']:.1f}", flush=True)
    report = (
        f"MNIST-1D, seeds {args.seeds}, {args.epochs} epochs ({2 * args.epochs} for SGD 2x); "
        f"{(time.perf_counter() - start) / 60:.0f} min in all\n\n{table(results, args.noise)}\n"
    )
    print("\n" + report)
    if args.out:
        args.out.write_text(report)
    if args.plot:
        plot(results, args.noise, args.plot)
    return report


if __name__ == "__main__":
    main()
