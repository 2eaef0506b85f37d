"""The frontier: what each method buys over tuned SGD, with confidence intervals, against what its step costs.

MNIST-1D with the app's setup (1-D CNN, SGD with momentum 0.9 and weight decay 5e-4, cosine schedule,
batch 128) at 40% label noise, EPOCHS epochs (long enough for SGD to memorize the noisy labels):

1. Tuning, on a tuning seed apart from the measurement seeds, by validation accuracy only: every method
   gets the same budget, a grid of BUDGET settings (the learning rate, and its radius for the SAM-type
   methods; SGD gets BUDGET learning rates). A grid whose best point lies on an edge is extended past
   that edge (for every method alike) until it does not, or until MAX_EXTENSIONS. Each protocol's best
   CONFIRM_TOP settings then run on a second tuning seed, and the best mean over both wins (one seed's
   best can sit next to a divergence and fail on other seeds). Two protocols are
   tuned and reported: the practitioner's (the checkpoint with the best validation accuracy) and the
   paper's (the weights after the last epoch; tuned on the last epoch's validation accuracy).
   GSAM, AE-SAM and F-SAM are tuned too (for the app's experiment config) but not measured.
2. Measuring, on seeds 0-7: each seed fixes the split, the noisy labels and the initialization for
   every method, so each method's test accuracy is paired with SGD's on the same seed. Reported: the
   mean paired difference to tuned SGD with its 95% confidence interval (Student's t over the seeds).
3. Cost per optimizer step: each method's Lightning step on the app's model, interleaved step by step
   with one plain-PyTorch SGD step (as lightning_overhead.py does), over Lightning's plain step
   against the same loop: not the wall time of the runs above, which shared the machine.

Runs go two at a time (one torch thread each) on a 2-core machine; the plan and its estimated time are
printed first. Prints and writes a markdown report, the tuned settings as the app's configs
(``--write-configs``: configs/tuned/mnist1d_label_noise/<method>.yaml, which
``experiment=mnist1d_label_noise sam=<method>`` picks up) and a plot of the paired gain against cost.

Usage: python benchmarks/frontier.py [--out benchmarks/results/frontier.md --plot benchmarks/results/frontier.png
--write-configs] (about an hour on 2 cores); --quick runs a tiny version in seconds.
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

EPOCHS = 60
NOISE = 0.4
TUNING_SEEDS = (100,)
#: the best CONFIRM_TOP settings of each protocol are run again on these seeds; the choice is by the mean over all
CONFIRM_SEEDS = (101,)
CONFIRM_TOP = 3
SEEDS = tuple(range(8))
MAX_EXTENSIONS = 2
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tuned" / "mnist1d_label_noise"

#: name: (app overrides, the radius key and its grid or None, the learning rates, the app's sam option)
METHODS: dict[str, tuple[list[str], tuple[str, list[float]] | None, list[float], str]] = {
    "SGD": (["sam=none"], None, [0.0125, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2], "none"),
    "SAM": (["sam=sam"], ("sam.rho", [0.05, 0.1, 0.2]), [0.05, 0.1, 0.2, 0.4], "sam"),
    "ASAM": (["sam=asam"], ("sam.rho", [0.5, 1.0, 2.0]), [0.05, 0.1, 0.2, 0.4], "asam"),
    "LookSAM": (["sam=looksam"], ("sam.rho", [0.05, 0.1, 0.2]), [0.05, 0.1, 0.2, 0.4], "looksam"),
    "late-phase SAM": (["sam=late_phase", "sam.start=0.5"], ("sam.rho", [0.05, 0.1, 0.2]), [0.05, 0.1, 0.2, 0.4],
                       "late_phase"),
    "GSAM": (["sam=gsam"], ("sam.rho", [0.05, 0.1, 0.2]), [0.05, 0.1, 0.2, 0.4], "gsam"),
    "AE-SAM": (["sam=aesam"], ("sam.rho", [0.05, 0.1, 0.2]), [0.05, 0.1, 0.2, 0.4], "aesam"),
    "F-SAM": (["sam=fsam"], ("sam.rho", [0.05, 0.1, 0.2]), [0.05, 0.1, 0.2, 0.4], "fsam"),
    "Momentum-SAM": (["sam=msam"], ("sam.rho", [0.3, 1.0, 3.0]), [0.05, 0.1, 0.2, 0.4], "msam"),
    "RWP": (["sam=rwp"], ("sam.sigma", [0.005, 0.01, 0.02]), [0.05, 0.1, 0.2, 0.4], "rwp"),
}  # fmt: skip
SINGLE_PASS = ("Momentum-SAM", "RWP")
#: tuned (so that the app's experiment runs them at their own setting) but not measured: not asked of the frontier
TUNED_ONLY = ("GSAM", "AE-SAM", "F-SAM")
PROTOCOLS = {"best": ("best validation checkpoint", "val_best", "test_best"),
             "last": ("weights after the last epoch", "val_last", "test_last")}  # fmt: skip

#: two-sided 95% quantiles of Student's t by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}  # fmt: skip


def t95(df: int) -> float:
    return _T95.get(df) or _T95[max(k for k in _T95 if k <= df)] if df >= 1 else float("nan")


# ---------------------------------------------------------------------------------------------- runs


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run(job: tuple[str, dict, int, int, list[str]]) -> dict:
    """One training run of the app (in a worker process): validation and test accuracies of both protocols."""
    from _app import run_app

    method, setting, seed, epochs, extra = job
    overrides, radius, _, _ = METHODS[method]
    tuned = [f"optimizer.lr={setting['lr']}"] + ([f"{radius[0]}={setting['radius']}"] if radius else [])
    result = run_app(
        f"trainer.max_epochs={epochs}", "trainer.accelerator=cpu", *extra, *overrides, *tuned,
        f"data.label_noise={NOISE}", f"seed={seed}", "test_last=true",
    )  # fmt: skip
    return {
        "val_best": 100 * result.get("best_val", float("nan")),
        "val_last": 100 * result["metrics"].get("val/acc", float("nan")),
        "test_best": 100 * result["test/acc"],
        "test_last": 100 * result["test_last/acc"],
    }


def _grid(method: str) -> list[dict]:
    _, radius, lrs, _ = METHODS[method]
    if radius is None:
        return [{"lr": lr} for lr in lrs]
    return [{"radius": r, "lr": lr} for r in radius[1] for lr in lrs]


def _extend(method: str, trials: dict, objective: str) -> list[dict]:
    """New settings past the edge the best setting lies on (none if it lies inside the grid)."""
    scores = {key: statistics.fmean(runs[objective] for runs in results) for key, results in trials.items()}
    best = dict(max(scores, key=scores.get))
    settings = [dict(k) for k in trials]
    found = []
    for axis in ("lr", "radius"):
        if axis not in best:
            continue
        values = sorted({s[axis] for s in settings})
        if len(values) < 2 or best[axis] not in (values[0], values[-1]):
            continue
        step = values[-1] / values[-2] if best[axis] == values[-1] else values[0] / values[1]
        new = round(best[axis] * step, 6)
        others = sorted({tuple((k, v) for k, v in s.items() if k != axis) for s in settings})
        found += [{**dict(o), axis: new} for o in others]
    return found


def tune(pool, method: str, epochs: int, extra: list[str], log) -> tuple[dict[str, dict], dict]:
    """The best setting for each protocol, and every trial: {setting (as a tuple): [results per tuning seed]}."""
    trials: dict = {}
    pending = _grid(method)
    best: dict[str, dict] = {}
    for extension in range(MAX_EXTENSIONS + 1):
        jobs = [(method, s, seed, epochs, extra) for s in pending for seed in TUNING_SEEDS]
        for (_, s, _, _, _), r in zip(jobs, pool.map(_run, jobs)):
            trials.setdefault(tuple(sorted(s.items())), []).append(r)
        pending = []
        for _, objective, _ in PROTOCOLS.values():
            new = [s for s in _extend(method, trials, objective) if tuple(sorted(s.items())) not in trials]
            pending += [s for s in new if s not in pending]
        if not pending or extension == MAX_EXTENSIONS:
            break
        log(f"  {method}: best on an edge, extending by {len(pending)} settings")
    finalists = list(trials)
    if CONFIRM_SEEDS:  # one seed's best may sit next to a divergence: the best few, confirmed on another seed
        finalists = []
        for _, objective, _ in PROTOCOLS.values():
            ranked = sorted(trials, key=lambda k: statistics.fmean(r[objective] for r in trials[k]), reverse=True)
            finalists += [k for k in ranked[:CONFIRM_TOP] if k not in finalists]
        jobs = [(method, dict(k), seed, epochs, extra) for k in finalists for seed in CONFIRM_SEEDS]
        for (_, s, _, _, _), r in zip(jobs, pool.map(_run, jobs)):
            trials[tuple(sorted(s.items()))].append(r)
    for protocol, (_, objective, _) in PROTOCOLS.items():
        key = max(finalists, key=lambda k: statistics.fmean(r[objective] for r in trials[k]))
        best[protocol] = dict(key)
    return best, trials


# ---------------------------------------------------------------------------------------------- cost


def step_costs(methods: list[str], steps: int, tuned: dict, rounds: int = 3) -> dict[str, float]:
    """Each method's Lightning step on the app's model over Lightning's plain step, both against one SGD loop.

    The median over ``rounds`` rounds, each method once a round (one round's ratios swing by about 5% on
    this shared machine).
    """
    import lightning_overhead as lo
    from torch.nn import functional as F

    from lightning_sam.methods import REGISTRY
    from lightning_sam.models import Classifier, ConvNet1D, SAMClassifier

    torch.manual_seed(0)
    n = (steps + lo.WARMUP + 1) * 128
    data = torch.utils.data.TensorDataset(torch.randn(n, 1, 40), torch.randint(0, 10, (n,)))
    loader = torch.utils.data.DataLoader(data, batch_size=128)
    net = ConvNet1D()

    def optimizer(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)

    def sgd_loop(reference: torch.nn.Module, own_loader):
        batches, opt = iter(own_loader), optimizer(reference.parameters())

        def step() -> None:
            x, y = next(batches)
            opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            opt.step()

        return step

    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for method in [m for _ in range(rounds) for m in methods]:
        option = METHODS[method][3]
        if option == "none":
            module = Classifier(copy.deepcopy(net), 10, optimizer)
        else:
            setting = tuned[method]
            kwargs = {REGISTRY[option].radius_name: setting["radius"]}
            if option == "late_phase":
                kwargs["start"] = 0  # its SAM steps: the cost of the part of the run that pays it
            module = SAMClassifier(copy.deepcopy(net), 10, optimizer, sam=REGISTRY[option](**kwargs))
        ratios[method].append(lo.interleaved_ratio(module, net, loader, reference=sgd_loop)[2])
    return {m: statistics.median(r) / statistics.median(ratios["SGD"]) for m, r in ratios.items()}


# ---------------------------------------------------------------------------------------------- report


def paired(results: dict, method: str, key: str) -> tuple[float, float, float]:
    """Mean paired difference to SGD over the seeds, and its 95% confidence interval."""
    diffs = [a[key] - b[key] for a, b in zip(results[method], results["SGD"])]
    mean = statistics.fmean(diffs)
    half = t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return mean, mean - half, mean + half


def report(tuned: dict, trials: dict, results: dict, cost: dict, epochs: int, minutes: float) -> str:
    lines = [
        f"MNIST-1D, {int(100 * NOISE)}% label noise, {epochs} epochs, batch 128, cosine; tuning seeds "
        f"{list(TUNING_SEEDS)} (each protocol's best {CONFIRM_TOP} confirmed on {list(CONFIRM_SEEDS)}, chosen by the "
        f"mean over both), measurement seeds {list(SEEDS[: len(results['SGD'])])}; {minutes:.0f} min on this "
        "machine (2 runs at a time).",
        "",
    ]
    for protocol, (title, _, key) in PROTOCOLS.items():
        lines += [
            f"**{title.capitalize()}** (test accuracy %; gain: mean paired difference to tuned SGD, 95% CI):",
            "",
            "| method | tuned setting | test acc. | gain over SGD [95% CI] | share of SAM's gain | cost per step |",
            "|---|---|---|---|---|---|",
        ]
        sam_gain = paired(results, "SAM", key)[0]
        for method in results:
            accs = [r[key] for r in results[method]]
            setting = _shown(method, tuned[method][protocol])
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            if method == "SGD":
                gain, share = "-", "-"
            else:
                mean, low, high = paired(results, method, key)
                gain = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
                share = f"{100 * mean / sam_gain:.0f}%" if sam_gain > 0 else "n/a"
            lines.append(
                f"| {method} | {setting} | {statistics.fmean(accs):.1f} ± {spread:.1f} | {gain} | {share} "
                f"| {cost.get(method, float('nan')):.2f}x |"
            )
        lines.append("")
    lines += ["Targets:", ""]
    best = paired(results, "SAM", "test_best")
    last = paired(results, "SAM", "test_last")
    lines.append(
        f"- Tuned SAM over tuned SGD, paper's protocol: {last[0]:+.1f} points [{last[1]:+.1f}, {last[2]:+.1f}] "
        f"(target >= +5 with an interval above 0): "
        + ("reached." if last[0] >= 5 and last[1] > 0 else f"missed (by {max(5 - last[0], 0):.1f} points).")
    )
    lines.append(
        f"- The same, practitioner's protocol: {best[0]:+.1f} [{best[1]:+.1f}, {best[2]:+.1f}] (interval above 0): "
        + ("reached." if best[1] > 0 else "missed.")
    )
    for title, _, key in PROTOCOLS.values():
        sam_gain = paired(results, "SAM", key)[0]
        for method in [m for m in SINGLE_PASS if m in results]:
            gain = paired(results, method, key)[0]
            share = gain / sam_gain if sam_gain > 0 else float("nan")
            ok = share >= 0.8 and cost.get(method, math.inf) <= 1.1
            lines.append(
                f"- {method} ({title}): {100 * share:.0f}% of SAM's gain at {cost.get(method, float('nan')):.2f}x "
                f"SGD's cost per step (target >= 80% at <= 1.1x): " + ("reached." if ok else "missed.")
            )
    lines += ["", "Per measurement seed (test accuracy %, best checkpoint / last epoch, seeds in order):", ""]
    for method, runs in results.items():
        lines.append(f"- {method}: " + ", ".join(f"{r['test_best']:.1f}/{r['test_last']:.1f}" for r in runs))
    lines += ["", "Tuning (mean validation accuracy % over the tuning seeds a setting ran on, best-checkpoint / "
              "last-epoch; [2]: confirmed on the second seed):", ""]  # fmt: skip
    for method, method_trials in trials.items():
        cells = [
            f"{_shown(method, dict(key))}: "
            f"{statistics.fmean(r['val_best'] for r in runs):.1f}/{statistics.fmean(r['val_last'] for r in runs):.1f}"
            + (f" [{len(runs)}]" if len(runs) > 1 else "")
            for key, runs in method_trials.items()
        ]
        lines.append(f"- {method} ({len(cells)} settings): " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def _shown(method: str, setting: dict) -> str:
    """``lr 0.1, rho 0.05``: a setting under the names the app uses."""
    radius = METHODS[method][1]
    return ", ".join(f"{radius[0].split('.')[1] if k == 'radius' and radius else k} {v}" for k, v in setting.items())


def plot(results: dict, cost: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (title, _, key) in zip(axes, PROTOCOLS.values()):
        for method in results:
            if method == "SGD":
                continue
            mean, low, high = paired(results, method, key)
            ax.errorbar(cost[method], mean, yerr=[[mean - low], [high - mean]], marker="o", capsize=3, label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="cost per optimizer step / SGD", title=title)
    axes[0].set_ylabel("test accuracy gain over tuned SGD (points, 95% CI)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"MNIST-1D, {int(100 * NOISE)}% label noise: paired gain against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_configs(tuned: dict) -> None:
    """The tuned settings (practitioner's protocol) as the app's configs for experiment=mnist1d_label_noise."""
    CONFIGS.mkdir(parents=True, exist_ok=True)
    for method, (overrides, radius, _, option) in METHODS.items():
        setting = tuned[method]["best"]
        lines = [
            "# @package _global_",
            f"# {method} at 40% label noise, tuned by benchmarks/frontier.py (best validation accuracy)",
            "optimizer:",
            f"  lr: {setting['lr']}  # tuned",
        ]
        fixed = [o.split("=", 1) for o in overrides if o.startswith("sam.")]  # what the tuning held fixed
        sam = [f"  {key[4:]}: {value}  # as tuned" for key, value in fixed]
        if radius is not None:
            sam.append(f"  {radius[0].split('.')[1]}: {setting['radius']}  # tuned")
        if sam:
            lines += ["sam:", *sam]
        (CONFIGS / f"{option}.yaml").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    global SEEDS, TUNING_SEEDS, MAX_EXTENSIONS, CONFIRM_TOP
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--plot", type=Path, help="write the plot (PNG) here")
    parser.add_argument("--write-configs", action="store_true", help="write configs/tuned/mnist1d_label_noise/")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="measurement seeds (0..n-1), at least 8")
    parser.add_argument("--workers", type=int, default=2, help="training runs at a time")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="a subset (SGD and SAM always run)")
    parser.add_argument("--quick", action="store_true", help="a tiny run: 1 epoch of 3 batches, 2 seeds, no extension")
    args = parser.parse_args(argv)
    methods = [m for m in METHODS if m in ("SGD", "SAM") or not args.methods or m in args.methods]
    extra: list[str] = []
    SEEDS = tuple(range(args.seeds))
    if args.quick:  # every step of the full run, on a tiny grid
        args.epochs, SEEDS, TUNING_SEEDS, MAX_EXTENSIONS, CONFIRM_TOP = 1, (0, 1), (100,), 0, 1
        for name, (overrides, radius, lrs, option) in list(METHODS.items()):
            METHODS[name] = (overrides, radius and (radius[0], radius[1][:1]), lrs[:2], option)
        extra = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {text}", flush=True)

    tuning_runs = sum(len(_grid(m)) for m in methods) * len(TUNING_SEEDS)
    tuning_runs += len(methods) * len(PROTOCOLS) * CONFIRM_TOP * len(CONFIRM_SEEDS)  # at most
    measuring_runs = 2 * len([m for m in methods if m not in TUNED_ONLY]) * len(SEEDS)  # at most: a setting a protocol
    tuned, trials, results = {}, {}, {}
    context = multiprocessing.get_context("spawn")  # fresh processes: no torch state forked
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker) as pool:
        calibration = time.perf_counter()
        list(pool.map(_run, [("SGD", {"lr": 0.1}, TUNING_SEEDS[0], args.epochs, extra)] * args.workers))
        per_run = time.perf_counter() - calibration  # one SGD run per worker, side by side
        estimate = per_run * (tuning_runs + measuring_runs) * 1.6 / args.workers  # SAM-type runs take up to 2x
        log(f"plan: {tuning_runs} tuning runs (more if a grid is extended), up to {measuring_runs} measuring runs, "
            f"{args.workers} at a time; an SGD run takes {per_run:.0f} s: about {estimate / 60:.0f} min")  # fmt: skip
        for method in methods:  # 1. the same budget for every method, on validation accuracy
            tuned[method], trials[method] = tune(pool, method, args.epochs, extra, log)
            log(f"tuned {method}: best checkpoint {tuned[method]['best']}, last epoch {tuned[method]['last']}")
        for method in [m for m in methods if m not in TUNED_ONLY]:  # 2. measured on paired seeds, per protocol
            settings = {p: tuned[method][p] for p in PROTOCOLS}
            jobs = {p: [(method, s, seed, args.epochs, extra) for seed in SEEDS] for p, s in settings.items()}
            runs = {"best": list(pool.map(_run, jobs["best"]))}
            runs["last"] = runs["best"] if settings["last"] == settings["best"] else list(pool.map(_run, jobs["last"]))
            results[method] = [
                {"test_best": b["test_best"], "test_last": la["test_last"]} for b, la in zip(runs["best"], runs["last"])
            ]
            log(f"measured {method}: best checkpoint {statistics.fmean(r['test_best'] for r in results[method]):.1f}%, "
                f"last epoch {statistics.fmean(r['test_last'] for r in results[method]):.1f}%")  # fmt: skip
    measured = [m for m in methods if m not in TUNED_ONLY]
    cost = step_costs(
        measured, 5 if args.quick else 200, rounds=1 if args.quick else 3, tuned={m: tuned[m]["best"] for m in measured}
    )
    log("costs per step: " + ", ".join(f"{m} {c:.2f}x" for m, c in cost.items()))
    text = report(tuned, trials, results, cost, args.epochs, (time.perf_counter() - start) / 60)
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    if args.plot:
        plot(results, cost, args.plot)
    if args.write_configs:
        write_configs(tuned)
    return text


if __name__ == "__main__":
    main()
