"""Loss-landscape pictures of trained runs: ``python -m lightning_sam.landscape RUN_DIR [RUN_DIR_B]``.

For each run (a directory written by ``python -m lightning_sam.train``) the loss on a fixed set of
training batches over a plane of filter-normalized random directions around its weights; with two
runs also the loss along the straight line between them (e.g. an SGD and a SAM solution). Saves one
PNG (needs matplotlib: ``pip install "lightning-sam[plots]"``) and prints the figures.

Example::

    python -m lightning_sam.train sam=none hydra.run.dir=runs/sgd
    python -m lightning_sam.train sam=sam hydra.run.dir=runs/sam
    python -m lightning_sam.landscape runs/sgd runs/sam --out landscape.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from lightning_sam.analysis import batch_loss, interpolate, plot_slices, random_plane
from lightning_sam.app.command_line import unwritable_folder
from lightning_sam.app.load import load_run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> Path:
    """Parse the command line, compute the slices, save the PNG and return its path."""
    parser = argparse.ArgumentParser(prog="python -m lightning_sam.landscape", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="one or two run directories")
    parser.add_argument("--out", type=Path, default=Path("landscape.png"), help="the PNG to write")
    parser.add_argument("--checkpoint", default="last", help="last, best, or a file name in checkpoints/")
    parser.add_argument("--batches", type=int, default=4, help="training batches the loss is averaged over")
    parser.add_argument("--span", type=float, default=1.0, help="the plane covers [-span, span]^2")
    parser.add_argument("--points", type=int, default=21, help="grid points per axis")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random directions")
    args = parser.parse_args(argv)
    problem = _check(args)
    if problem:
        parser.error(problem)

    nets, batches = [], None
    for run in args.runs:
        try:
            net, datamodule = load_run(run, args.checkpoint)
        except FileNotFoundError as err:
            parser.error(str(err))
        nets.append(net)
        if batches is None:  # the first run's data and split, the same batches for every slice
            datamodule.setup("fit")
            loader = torch.utils.data.DataLoader(datamodule.train_set, batch_size=datamodule.batch_size)
            batches = [
                datamodule.on_after_batch_transfer(b, 0) if hasattr(datamodule, "_mean_std") else b
                for _, b in zip(range(args.batches), loader)
            ]
    assert batches is not None
    planes = {}
    for run, net in zip(args.runs, nets):
        planes[run.name] = random_plane(net, batch_loss(net, batches), args.span, args.points, args.seed)
        print(
            f"{run.name}: loss {planes[run.name][2][args.points // 2, args.points // 2]:.4f} at the center, "
            f"{planes[run.name][2].mean():.4f} on average over the plane"
        )
    lines = {}
    if len(nets) == 2:
        a, b = (n.state_dict() for n in nets)
        line = interpolate(nets[0], a, b, batch_loss(nets[0], batches))
        lines[f"{args.runs[0].name} -> {args.runs[1].name}"] = line
        print("interpolation: " + ", ".join(f"{x:+.2f}: {loss:.4f}" for x, loss in line[::5]))
    path = plot_slices(args.out, lines, planes, title="loss on training batches")
    print(f"saved {path}")
    return path


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, before any run is loaded (``None``: nothing)."""
    if len(args.runs) > 2:
        return "give one or two run directories"
    for run in args.runs:
        if not run.is_dir():
            return f"{run} is not a run directory (expected the hydra.run.dir of a training run)"
    if args.batches < 1:
        return f"--batches must be an int >= 1, got {args.batches}"
    if args.points < 2:
        return f"--points must be an int >= 2 (grid points per axis), got {args.points}"
    if not math.isfinite(args.span) or args.span <= 0:
        return f"--span must be a positive number, got {args.span}"
    if args.out.is_dir():
        return f"--out {args.out} is a folder: give the file to write (e.g. {args.out / 'landscape.png'})"
    if args.out.suffix.lower() != ".png":
        return f"--out must name a .png file, got {args.out}"
    problem = unwritable_folder(args.out.absolute().parent)
    return f"--out {args.out}: {problem}" if problem else None


if __name__ == "__main__":
    main()
