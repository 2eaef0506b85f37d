"""What SAM buys per unit of compute: every method tuned with the same budget, then measured.

With the training app's MNIST-1D setup (1-D CNN, SGD with momentum 0.9 and weight decay 5e-4,
cosine schedule, batch 128, EPOCHS epochs):

1. Tuning, at 40% label noise on seed 0: every method gets the same budget of four runs, a grid of
   its rho (its default and twice it) and the learning rate (0.2 or 0.4); SGD and SGD with twice the
   epochs get four learning rates (0.1 to 0.4). The choice is by the best validation accuracy (never test).
2. Measuring: each tuned method at 0, 20 and 40% label noise, seeds 0-2: test accuracy, the top
   Hessian eigenvalue of the training loss after the last epoch (HessianMonitor), and the cost per
   optimizer step relative to SGD's, from the training time of the runs of this report (same machine,
   same session; SGD 2x takes twice the steps at SGD's cost per step).

Prints and writes a markdown report (tables, targets reached or not) and a plot of test accuracy at
40% noise against cost per step: the frontier a user chooses from.

Usage: python benchmarks/quality_report.py [--out benchmarks/results/quality.md --plot benchmarks/results/quality.png]
(about 40 minutes on 2 CPU cores); --quick runs a tiny version in seconds.
"""

import itertools
import statistics
import time
from pathlib import Path

from _app import grid_parser, mean_sd, run_app

EPOCHS = 20
# A first grid (lr 0.05 or 0.2; SGD 0.025-0.2) put every method's best learning rate at its top, 0.2:
# this one is centred there.
LRS = (0.2, 0.4)  # the learning rates every SAM-type method is tuned over
SGD_LRS = (0.1, 0.2, 0.3, 0.4)  # the same budget (four runs) for SGD
METHODS: dict[str, tuple[list[str], tuple[float, ...]]] = {  # overrides, the rhos tried
    "SGD": (["sam=none"], ()),
    "SGD, 2x epochs": (["sam=none", "trainer.max_epochs={twice}"], ()),
    "SAM": (["sam=sam"], (0.05, 0.1)),  # the method's default rho and twice it
    "ASAM": (["sam=asam"], (0.5, 1.0)),
    "GSAM": (["sam=gsam"], (0.05, 0.1)),
    "LookSAM (k 5, alpha 0.2)": (["sam=looksam", "sam.alpha=0.2"], (0.05, 0.1)),
    "late-phase SAM (last 20%)": (["sam=late_phase", "sam.start=0.8"], (0.05, 0.1)),
    "AE-SAM (c 0)": (["sam=aesam"], (0.05, 0.1)),
    "F-SAM (sigma 1, lam 0.9)": (["sam=fsam"], (0.05, 0.1)),
}


def candidates(method: str) -> list[dict]:
    """The four settings a method is tuned over."""
    _, rhos = METHODS[method]
    if not rhos:
        return [{"lr": lr} for lr in SGD_LRS]
    return [{"rho": rho, "lr": lr} for rho, lr in itertools.product(rhos, LRS)]


def run(method: str, setting: dict, noise: float, seed: int, epochs: int, extra: list[str]) -> dict:
    overrides = [o.format(twice=2 * epochs) for o in METHODS[method][0]]
    tuned = [f"optimizer.lr={setting['lr']}"] + ([f"sam.rho={setting['rho']}"] if "rho" in setting else [])
    result = run_app(
        f"trainer.max_epochs={epochs}",
        *extra,
        *overrides,  # after the epochs: "2x epochs" overrides them
        *tuned,
        f"data.label_noise={noise}",
        f"seed={seed}",
        "callbacks=hessian",
        "callbacks.hessian.every_n_epochs=1000000",  # measured once, after the last epoch
    )
    return {
        "val": 100 * result.get("best_val", float("nan")),
        "acc": 100 * result["test/acc"],
        "eig": result["metrics"].get("sharpness/hessian_max_eig", float("nan")),
        "seconds_per_step": result["fit_seconds"] / max(result["global_step"], 1),
    }


def costs(results: dict, noises: list[float]) -> dict[str, float]:
    """Each method's training time per optimizer step over SGD's, from the runs of this report."""
    per_step = {m: statistics.mean(r["seconds_per_step"] for n in noises for r in results[(m, n)]) for m in METHODS}
    return {m: seconds / per_step["SGD"] for m, seconds in per_step.items()}


def report(
    tuned: dict, trials: dict, results: dict, noises: list[float], seeds: list[int], epochs: int, minutes: float
) -> str:
    cost = costs(results, noises)
    head = "| method | tuned | " + " | ".join(f"{int(100 * n)}% noise | top Hessian eig." for n in noises)
    lines = [head + " | cost per step / SGD |", "|---" * (2 * len(noises) + 3) + "|"]
    for method in METHODS:
        cells = []
        for n in noises:
            runs = results[(method, n)]
            cells += [mean_sd([r["acc"] for r in runs]), mean_sd([r["eig"] for r in runs])]
        setting = ", ".join(f"{k} {v}" for k, v in tuned[method].items())
        lines.append(f"| {method} | {setting} | " + " | ".join(cells) + f" | {cost[method]:.2f}x |")

    worst = max(noises)

    def acc(method: str) -> float:
        return statistics.mean(r["acc"] for r in results[(method, worst)])

    def eig(method: str) -> float:
        return statistics.mean(r["eig"] for r in results[(method, worst)])

    gain = acc("SAM") - acc("SGD")
    cheap = [m for m in METHODS if m not in ("SGD", "SGD, 2x epochs", "SAM") and cost[m] <= 1.3]
    kept = {m: (acc(m) - acc("SGD")) / gain if gain > 0 else float("nan") for m in cheap}
    best_cheap = max(kept, key=kept.get) if kept else None
    targets = [
        f"- Tuned SAM - tuned SGD at {int(100 * worst)}% noise: {gain:+.1f} points (target >= +5): "
        + ("reached." if gain >= 5 else f"missed by {5 - gain:.1f}."),
        f"- Top Hessian eigenvalue, SGD / SAM at {int(100 * worst)}% noise: {eig('SGD') / eig('SAM'):.1f}x "
        f"(target >= 2x): " + ("reached." if eig("SGD") / eig("SAM") >= 2 else "missed."),
        "- A method at <= 1.3x SGD's cost keeping >= 80% of SAM's gain: "
        + (
            f"{best_cheap} keeps {100 * kept[best_cheap]:.0f}% at {cost[best_cheap]:.2f}x ("
            + ("reached" if kept[best_cheap] >= 0.8 else "missed")
            + ")."
            if best_cheap
            else "no method ran at <= 1.3x."
        ),
    ]
    tuning_lines = ["| method | " + " | ".join(f"setting {i + 1}" for i in range(4)) + " |", "|---" * 5 + "|"]
    for method in METHODS:
        cells = [f"{', '.join(f'{k} {v}' for k, v in s.items())}: {v:.1f}" for s, v in trials[method]]
        tuning_lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return (
        f"MNIST-1D, {epochs} epochs ({2 * epochs} for SGD 2x), batch 128, cosine; seeds {seeds}; "
        f"{minutes:.0f} min in all on this machine.\n\n"
        f"Tuning (validation accuracy %, {int(100 * worst)}% label noise, seed {seeds[0]}; four runs per method):\n\n"
        + "\n".join(tuning_lines)
        + "\n\nTest accuracy % (mean ± sd over seeds) with the tuned settings:\n\n"
        + "\n".join(lines)
        + "\n\nTargets:\n\n"
        + "\n".join(targets)
        + "\n"
    )


def plot(results: dict, noise: float, cost: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        accs = [r["acc"] for r in results[(method, noise)]]
        ax.errorbar(cost[method], statistics.mean(accs), yerr=statistics.stdev(accs) if len(accs) > 1 else 0,
                    marker="o", capsize=3, label=method)  # fmt: skip
    ax.set(xlabel="cost per optimizer step / SGD", ylabel="test accuracy (%)",
           title=f"MNIST-1D, {int(100 * noise)}% label noise, tuned methods")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = grid_parser(epochs=EPOCHS)
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--plot", type=Path, help="write the plot (PNG) here")
    parser.add_argument("--quick", action="store_true", help="one seed, one noise level, 1 epoch of 3 batches")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="a subset (SGD and SAM always run)")
    args = parser.parse_args(argv)
    if args.methods:
        for name in [m for m in METHODS if m not in {"SGD", "SAM", *args.methods}]:
            del METHODS[name]
    extra: list[str] = []
    if args.quick:
        args.seeds, args.noise, args.epochs = [0], [0.4], 1
        extra = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    start = time.perf_counter()
    worst, tuned, trials_of = max(args.noise), {}, {}
    for method in METHODS:  # 1. the same budget for every method, on validation accuracy
        trials = [(s, run(method, s, worst, args.seeds[0], args.epochs, extra)["val"]) for s in candidates(method)]
        trials_of[method] = trials
        tuned[method] = max(trials, key=lambda t: t[1])[0]
        print(f"tuned {method}: {tuned[method]} (val {max(v for _, v in trials):.1f}%)", flush=True)
    results: dict = {}
    for noise, seed, method in itertools.product(args.noise, args.seeds, METHODS):  # 2. measured
        r = run(method, tuned[method], noise, seed, args.epochs, extra)
        results.setdefault((method, noise), []).append(r)
        print(f"{method:28s} noise {noise:.1f} seed {seed}: {r['acc']:.1f}% eig {r['eig']:.1f}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    text = report(tuned, trials_of, results, args.noise, args.seeds, args.epochs, minutes)
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    if args.plot:
        plot(results, worst, costs(results, args.noise), args.plot)
    return text


if __name__ == "__main__":
    main()
