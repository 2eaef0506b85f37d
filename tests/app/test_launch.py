"""Hyperparameter search (Optuna) and launching (submitit) through the app, as users run them."""

import csv
import subprocess
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_module("lightning_sam.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def _app(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_sam.train", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_optuna_search_tunes_rho_and_lr_on_validation_accuracy(tmp_path, mnist1d_dir):
    result = _app(
        tmp_path, "hparams_search=rho", "debug=default", f"data.data_dir={mnist1d_dir}",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (found,) = tmp_path.glob("multirun/debug/*/optimization_results.yaml")
    best = yaml.safe_load(found.read_text())
    assert set(best["best_params"]) == {"sam.rho", "optimizer.lr"}
    trials = sorted(found.parent.glob("[0-9]*/metrics.csv"))
    assert len(trials) == 2
    best_val = []
    for trial in trials:
        with open(trial) as f:
            best_val.append(max(float(r["val/acc"]) for r in csv.DictReader(f) if r["val/acc"]))
    assert best["best_value"] == max(best_val)  # the objective is validation accuracy, not test


def test_baseline_search_has_the_same_budget_without_sam():
    rho, lr = _compose("hparams_search=rho"), _compose("hparams_search=lr")
    assert lr.sam._target_ is None and set(lr.hydra.sweeper.params) == {"optimizer.lr"}
    assert set(rho.hydra.sweeper.params) == {"sam.rho", "optimizer.lr"}
    assert rho.hydra.sweeper.n_trials == lr.hydra.sweeper.n_trials
    assert rho.hydra.sweeper.params["optimizer.lr"] == lr.hydra.sweeper.params["optimizer.lr"]
    assert rho.hydra.sweeper.direction == "maximize"


def test_slurm_launcher_runs_one_task_per_device():
    cfg = _compose("launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert cfg.trainer.strategy == "ddp"


def test_one_job_through_submitit_local(tmp_path, mnist1d_dir):
    result = _app(tmp_path, "-m", "launcher=local", "debug=default", f"data.data_dir={mnist1d_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tmp_path.glob("multirun/debug/*/0")
    assert (run / "metrics.csv").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    logs = "".join(p.read_text() for p in tmp_path.glob("multirun/debug/*/.submitit/*/*.out"))
    assert "Job completed successfully" in logs
