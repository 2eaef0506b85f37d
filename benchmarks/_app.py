"""Run the training app in-process for benchmarks: compose the configs, train, return the results."""

import argparse
import logging
import statistics
import tempfile
import warnings
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lightning_sam.train import train

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def grid_parser(epochs: int) -> argparse.ArgumentParser:
    """The arguments every accuracy benchmark takes: the seeds, noise levels and epochs of its grid."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--epochs", type=int, default=epochs)
    return parser


def mean_sd(values: list[float], digits: int = 1) -> str:
    """``mean ± standard deviation`` of the runs of a table cell (0 spread for one run)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def run_app(*overrides: str, data_dir: Path = DATA_DIR) -> dict:
    """Train with the given Hydra overrides (quiet: no progress bar, no logger, no checkpoints kept)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        GlobalHydra.instance().clear()
        with initialize_config_module("lightning_sam.configs", version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    f"output_dir={tmp}",
                    f"data.data_dir={data_dir}",
                    "logger={}",
                    "callbacks.progress=null",
                    "callbacks.lr_monitor=null",
                    "+trainer.enable_progress_bar=false",
                    "+trainer.enable_model_summary=false",
                    *overrides,
                ],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.data.data_dir = str(data_dir)
        return train(cfg)
