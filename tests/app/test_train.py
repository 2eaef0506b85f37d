import csv
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_sam.app.checks import ConfigError, build, check_batch_limits, check_top_level
from lightning_sam.app.train import train
from lightning_sam.data import CIFAR10DataModule, MNIST1DDataModule, read_cifar

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_"))


@pytest.fixture(scope="session")
def data_dir(mnist1d_dir):
    """MNIST-1D, and a tiny CIFAR-10 archive in the standard format."""
    root = mnist1d_dir
    write_tiny_cifar(
        root, "cifar-10-batches-py", [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"], "labels", 10
    )
    return root


def write_tiny_cifar(root: Path, folder: str, files: list[str], label_key: str, classes: int) -> None:
    """Batch files of 12 random images each, pickled as in the official archives."""
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True)
    for name in files:
        batch = {"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8), label_key: rng.integers(0, classes, 12)}
        batch[label_key] = [int(v) for v in batch[label_key]]
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch, f)


def compose_cfg(tmp_path: Path, data_dir: Path, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_module("lightning_sam.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.data.data_dir = str(data_dir)
    return cfg


def test_every_group_option_composes_and_instantiates(tmp_path, data_dir):
    choices = compose_cfg(tmp_path, data_dir).hydra.runtime.choices
    assert sorted(g for g in choices if not g.startswith("hydra/")) == GROUPS  # every group train.yaml names
    for group in [g for g in GROUPS if g != "tuned"]:  # tuned: chosen by experiment and sam (the test below)
        options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
        assert options, group
        for option in options:
            cfg = compose_cfg(tmp_path, data_dir, f"{group}={option}")
            assert cfg.hydra.runtime.choices[group] == option
            node = cfg[group] if group in cfg and group not in ("experiment", "debug") else None
            if group == "model":
                net = instantiate(node, num_classes=10)
                assert net(torch.zeros(2, *((1, 40) if option == "cnn1d" else (3, 32, 32)))).shape == (2, 10)
            elif group in ("callbacks", "logger"):
                built = 0
                for name, sub in node.items():
                    if sub is not None:
                        assert instantiate(sub) is not None, name
                        built += 1
                assert built, f"{group}={option} builds nothing"
            elif group == "optimizer":
                assert isinstance(instantiate(node)([torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)
            elif group == "scheduler" and node._target_ is not None:
                opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
                assert instantiate(node)(opt) is not None
            elif group == "sam" and node._target_ is not None:
                assert instantiate(node).radius >= 0
            elif group == "trainer":
                gpu = cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available()
                assert instantiate(node, **({"accelerator": "cpu"} if gpu else {})) is not None
            elif group == "data":
                assert instantiate(node) is not None
            else:  # experiment, debug: the whole config still instantiates its parts
                instantiate(cfg.model, num_classes=10)
                instantiate(cfg.data)


def test_an_experiment_runs_every_method_at_its_own_tuned_setting(tmp_path, data_dir):
    from lightning_sam.methods import REGISTRY

    tuned = CONFIGS / "tuned" / "mnist1d_label_noise"
    assert sorted(p.stem for p in tuned.glob("*.yaml")) == sorted([*REGISTRY, "none"])  # every method, and SGD
    for option in [*REGISTRY, "none"]:
        saved = OmegaConf.load(tuned / f"{option}.yaml")
        cfg = compose_cfg(tmp_path, data_dir, "experiment=mnist1d_label_noise", f"sam={option}")
        assert cfg.hydra.runtime.choices.tuned == f"mnist1d_label_noise/{option}"
        assert cfg.optimizer.lr == saved.optimizer.lr
        for key, value in saved.get("sam", {}).items():
            assert cfg.sam[key] == value, (option, key)
        typed = compose_cfg(tmp_path, data_dir, "experiment=mnist1d_label_noise", f"sam={option}", "optimizer.lr=0.01")
        assert typed.optimizer.lr == 0.01  # the command line still wins
    plain = compose_cfg(tmp_path, data_dir, "sam=msam")  # no experiment: the method's own defaults
    assert plain.sam.rho == OmegaConf.load(CONFIGS / "sam" / "msam.yaml").rho


@pytest.mark.parametrize(
    "overrides",
    [
        ["sam=sam"],
        ["sam=asam", "optimizer=adamw"],
        ["sam=none"],
        ["sam=sam", "scheduler=step", "logger=tensorboard"],
        ["sam=late_phase", "sam.start=0.5"],
        ["sam=aesam", "sam.c=-inf"],
        ["sam=fsam"],
        ["sam=msam"],
        ["sam=rwp", "sam.eta=0.1"],
    ],
    ids=["sam-sgd", "asam-adamw", "none", "sam-step-tb", "late-phase", "aesam", "fsam", "msam", "arwp"],
)
def test_app_runs_and_tests(tmp_path, data_dir, overrides, capsys):
    cfg = compose_cfg(tmp_path, data_dir, "debug=default", *overrides)
    result = train(cfg)
    assert 0 <= result["test/acc"] <= 1
    assert result["tested_checkpoint"].endswith(".ckpt")
    out = capsys.readouterr().out
    assert "test accuracy:" in out and str(tmp_path) in out
    if "logger=tensorboard" in overrides:
        assert list((tmp_path / "tensorboard").glob("events.*"))
        return
    with open(tmp_path / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"train/loss", "train/acc", "val/acc", "test/acc"} <= columns
    sam_keys = {"sam/sharpness", "sam/eps_norm", "sam/grad_norm", "sam/rho", "sam/perturbed_loss"}
    if any(o in overrides for o in ("sam=msam", "sam=rwp")):  # one pass: no loss at w; RWP: no gradient norm
        single = {"sam/eps_norm", "sam/rho", "sam/perturbed_loss"}
        single |= {"sam/grad_norm"} if "sam=msam" in overrides else set()
        assert single <= columns and "sam/sharpness" not in columns
    else:
        assert sam_keys <= columns if "sam=none" not in overrides else not (sam_keys & columns)
    assert ("sam/sam_fraction" in columns) == ("sam=aesam" in overrides)


def _grad_norm(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


CLIP_PROBES: list = []  # each ClipProbe the app built


class ClipProbe(pl.Callback):
    """Built by the app from ``callbacks.clip_probe``.

    Keeps the clipping settings of the Trainer it was given to, and the gradient norm of each optimizer
    step before clipping and as the optimizer steps with it.
    """

    def __init__(self):
        self.settings, self.before, self.stepped = None, [], []
        CLIP_PROBES.append(self)

    def on_train_start(self, trainer, pl_module):
        self.settings = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm, trainer.accumulate_grad_batches)
        for optimizer in trainer.optimizers:  # after the step, p.grad is still what the step used
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.stepped.append(_grad_norm(opt)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # Lightning clips right after this hook
        self.before.append(_grad_norm(optimizer))


def test_app_passes_accumulation_and_clipping_to_the_trainer(tmp_path, data_dir):
    cfg = compose_cfg(
        tmp_path, data_dir, "debug=default", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.5",
        f"+callbacks.clip_probe._target_={__name__}.ClipProbe",
    )  # fmt: skip
    CLIP_PROBES.clear()
    assert train(cfg)["global_step"] == 2  # 4 micro-batches, 2 optimizer steps
    (probe,) = CLIP_PROBES
    assert probe.settings == (0.5, "norm", 2)
    assert len(probe.before) == len(probe.stepped) == 2
    assert max(probe.before) > 0.5  # so clipping has something to do
    # the optimizer steps with the descent gradient clipped to norm 0.5 (torch's clip_grad_norm_ divides by norm + 1e-6)
    assert probe.stepped == pytest.approx([min(b, 0.5) for b in probe.before], rel=1e-5)


def test_app_run_resumed_at_an_epoch_boundary_equals_the_uninterrupted_one(tmp_path, data_dir):
    """Shuffled batches included: the order of an epoch depends on (seed, epoch) only."""
    short = ["debug=default", "scheduler=none", "test=false", "trainer.limit_val_batches=1"]

    def weights(run: Path) -> dict:
        return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]

    train(compose_cfg(tmp_path / "whole", data_dir, *short, "trainer.max_epochs=2"))
    train(compose_cfg(tmp_path / "first", data_dir, *short, "trainer.max_epochs=1"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_cfg(tmp_path / "resumed", data_dir, *short, "trainer.max_epochs=2", f"ckpt_path={ckpt}"))
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not all(torch.equal(whole[k], weights(tmp_path / "first")[k]) for k in whole)


def test_label_noise_flips_the_stated_fraction_of_training_labels_only(data_dir):
    clean = MNIST1DDataModule(data_dir, label_noise=0.0, seed=3)
    noisy = MNIST1DDataModule(data_dir, label_noise=0.25, seed=3)
    again = MNIST1DDataModule(data_dir, label_noise=0.25, seed=3)
    other = MNIST1DDataModule(data_dir, label_noise=0.25, seed=4)
    for dm in (clean, noisy, again, other):
        dm.setup("fit")
    y_clean, y_noisy = clean.train_set.tensors[1], noisy.train_set.tensors[1]
    assert torch.equal(y_clean, noisy.clean_train_labels)
    assert (y_noisy != y_clean).float().mean().item() == pytest.approx(0.25, abs=1 / len(y_clean))
    assert torch.equal(y_noisy, again.train_set.tensors[1])  # the same labels for the same seed
    assert not torch.equal(noisy.train_set.tensors[1], other.train_set.tensors[1])
    assert torch.equal(noisy.val_set.tensors[1], clean.val_set.tensors[1])  # validation stays clean
    assert torch.equal(noisy.test_set.tensors[1], clean.test_set.tensors[1])  # test stays clean


def test_cifar_reader_on_a_tiny_archive(tmp_path, data_dir):
    x, y, x_test, _ = read_cifar(data_dir, "cifar10")
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (60,)
    assert x_test.shape == (12, 3, 32, 32)
    # the .tar.gz alone is extracted on first use
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(data_dir / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    x2, *_ = read_cifar(tmp_path, "cifar10")
    assert torch.equal(x, x2)
    # CIFAR-100 has one train and one test file with fine labels
    write_tiny_cifar(tmp_path, "cifar-100-python", ["train", "test"], "fine_labels", 100)
    x100, y100, *_ = read_cifar(tmp_path, "cifar100")
    assert x100.shape == (12, 3, 32, 32) and y100.max() < 100


def test_cifar_pickles_may_hold_only_arrays(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": os.system, "labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_cifar(tmp_path, "cifar10")


def test_app_on_cifar_with_resnet18(tmp_path, data_dir):
    cfg = compose_cfg(
        tmp_path,
        data_dir,
        "debug=default",
        "data=cifar10",
        "model=resnet18",
        "data.batch_size=8",
        "data.val_fraction=0.2",
        "data.num_workers=0",
        "trainer.limit_train_batches=2",
    )
    assert 0 <= train(cfg)["test/acc"] <= 1


def test_cifar_batches_are_augmented_only_in_training(data_dir):
    dm = CIFAR10DataModule(data_dir)
    dm.setup("fit")
    x, y = dm.train_set[:4]
    plain = dm.on_after_batch_transfer((x, y), 0)[0]
    assert plain.shape == (4, 3, 32, 32) and abs(plain.mean().item()) < 1.0


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("sam.rho=-0.1", r"`sam.rho` to be a finite, non-negative float, got -0.1"),
        ("sam.rho=nan", r"`sam.rho` to be a finite, non-negative float, got nan"),
        ("sam=asam sam.eta=-1", r"`sam.eta` to be a finite, non-negative float"),
        ("data.label_noise=1.0", r"`data.label_noise` to be a fraction in \[0, 1\), got 1.0"),
        ("data.batch_size=0", r"`data.batch_size` to be an int >= 1, got 0"),
        ("data.label_noise=abc", r"`data.label_noise` to be a fraction in \[0, 1\), got 'abc'"),
        ("seed=abc", r"`seed` to be an int in \[0, 2\*\*32\), got 'abc'"),
        ("seed=-1", r"`seed` to be an int in \[0, 2\*\*32\), got -1"),
        ("test=maybe", r"`test` to be true or false, got 'maybe'"),
        ("sam=none trainer.accumulate_grad_batches=0", r"`trainer.accumulate_grad_batches` to be an int >= 1, got 0"),
        ("sam=none trainer.gradient_clip_val=-1", r"`trainer.gradient_clip_val` to be null or a non-negative"),
        ("trainer.gradient_clip_algorithm=foo", r"`trainer.gradient_clip_algorithm` to be one of 'norm', 'value'"),
        ("model=resnet18", r"model=resnet18 does not take the inputs of data=mnist1d \(samples of shape \(1, 40\)\)"),
        ("optimizer.lr=abc", r"`optimizer.lr` to be a non-negative number, got 'abc'"),
        ("optimizer.lr=-0.1", r"`optimizer.lr` to be a non-negative number, got -0.1"),
        ("optimizer=adamw optimizer.betas=[2,0]", r"`optimizer.betas` to be two numbers in \[0, 1\), got \[2, 0\]"),
        ("model=wrn28_10 model.dropout=2", r"`model.dropout` to be a number in \[0, 1\), got 2"),
        ("model.channels=0", r"`model.channels` to be an int >= 1, got 0"),
        ("data.num_workers=-1", r"`data.num_workers` to be an int >= 0, got -1"),
        ("data=cifar10", r"CIFAR-10 is not in data.data_dir=.*data.download=true"),
        ("sam.only=nomatch", r"Invalid `sam.only='nomatch'`: `only='nomatch'` selects no parameter"),
        ("callbacks.checkpoint.monitor=val/acc_typo",
         r"`callbacks.checkpoint.monitor` to be one of \[.*'val/acc'.*got 'val/acc_typo'"),
        ("trainer.max_epochs=-1", r"`scheduler.T_max` to be an int >= 1 .*trainer.max_epochs=-1"),
        ("trainer.max_epochs=0", r"`trainer.max_epochs` to be an int >= 1"),
        ("trainer.limit_train_batches=0", r"`trainer.limit_train_batches` to be a positive number"),
        ("ckpt_path=/nonexistent/last.ckpt",
         r"`ckpt_path` to be a checkpoint file, got '/nonexistent/last.ckpt': no such"),
    ],
)  # fmt: skip
def test_bad_input_is_named_before_training(tmp_path, data_dir, override, match):
    overrides = override.split()
    cfg = compose_cfg(tmp_path, data_dir, "debug=default", *overrides)
    if overrides[0] == "data=cifar10":
        with open_dict(cfg):
            cfg.data.data_dir = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "the file is empty"), (b"garbage" * 10, "it cannot be read"), ("truncated", "it cannot be read")],
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_checkpoints_are_named(tmp_path, data_dir, content, match):
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(content)
    cfg = compose_cfg(tmp_path / "run", data_dir, "debug=default", f"ckpt_path={path}")
    with pytest.raises(ConfigError, match=rf"`ckpt_path` to be a checkpoint file, got '{path}': {match}"):
        train(cfg)


def test_a_checkpoint_of_another_model_names_the_key(tmp_path, data_dir):
    train(compose_cfg(tmp_path / "a", data_dir, "debug=default", "test=false", "model.channels=16"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(tmp_path / "b", data_dir, "debug=default", f"ckpt_path={ckpt}")
    message = r"holds another model: `net\.classifier\.weight` is \(10, 16\) in the checkpoint and \(10, 32\)"
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_download_without_network_is_named(tmp_path, data_dir, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    cfg = compose_cfg(tmp_path, data_dir, "debug=default", "data=cifar10", "data.download=true")
    with open_dict(cfg):
        cfg.data.data_dir = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"Could not get the data for data=cifar10 .*network is unreachable"):
        train(cfg)


def test_the_objective_is_the_best_validation_accuracy(tmp_path, data_dir):
    result = train(compose_cfg(tmp_path, data_dir, "debug=default", "trainer.max_epochs=3"))
    with open(tmp_path / "metrics.csv") as f:
        val = [float(r["val/acc"]) for r in csv.DictReader(f) if r["val/acc"]]
    assert len(val) == 3 and result["best_val"] == pytest.approx(max(val))


def test_degenerate_but_valid_settings_warn(tmp_path, data_dir, caplog):
    with caplog.at_level("WARNING", logger="lightning_sam.train"):
        train(compose_cfg(tmp_path / "a", data_dir, "debug=default", "data.val_fraction=0"))
    assert "data.val_fraction=0: no validation split" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_sam.train"):
        train(compose_cfg(tmp_path / "tiny", data_dir, "debug=default", "data.val_fraction=0.0001", "test=false"))
    assert "data.val_fraction=0.0001 holds out no sample: no validation split" in caplog.text
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_sam.train"):
        train(compose_cfg(tmp_path / "b", data_dir, "debug=default", "sam=none", "trainer.max_epochs=2",
                          f"ckpt_path={ckpt}"))  # fmt: skip
    assert "trained with SAM(rho=0.05); resuming it with sam=none" in caplog.text


@pytest.mark.parametrize(
    "override",
    ["trainer.log_every_n_steps=null", "trainer.log_every_n_steps=0", "trainer.deterministic=warn",
     "trainer.deterministic=null", "trainer.limit_val_batches=0", "trainer.limit_train_batches=0.5",
     "trainer.limit_test_batches=0.2", "data.seed=7", "data.seed=-1",
     "+trainer.fast_dev_run=true trainer.limit_val_batches=0.1",
     "+trainer.overfit_batches=2 trainer.limit_val_batches=0.1",
     "+trainer.val_check_interval=10 +trainer.check_val_every_n_epoch=null",
     "+trainer.val_check_interval=10 trainer.limit_val_batches=0"],
)  # fmt: skip
def test_valid_edge_values_pass_the_checks(tmp_path, data_dir, override):
    """What the checks refuse stops at what Lightning itself refuses: these train."""
    cfg = compose_cfg(tmp_path, data_dir, "debug=default", *override.split())
    check_top_level(cfg)
    datamodule = build(cfg, "data")
    datamodule.prepare_data()
    check_batch_limits(cfg, datamodule)


def test_unknown_group_option_lists_the_accepted_ones(tmp_path, data_dir):
    with pytest.raises(ConfigCompositionException, match=r"Could not find 'sam/foo'"):
        compose_cfg(tmp_path, data_dir, "sam=foo")


def test_command_line(tmp_path, data_dir):
    """The real entry point, as a user runs it: python -m lightning_sam.train."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_sam.train",
            "debug=default",
            f"data.data_dir={data_dir}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy:" in result.stdout
    assert (tmp_path / "run" / "metrics.csv").exists() and (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    assert "exists and is not empty" not in result.stderr and "LeafSpec" not in result.stderr  # no false alarms
    # a bad value through the real entry point: tests/app/test_faults.py (one line, exit 2, no directory)


def test_command_line_sweeps_an_experiment_and_keeps_the_last_checkpoint(tmp_path, data_dir):
    """-m with an experiment (its run directory is resolved before the jobs), and last.ckpt is the last epoch."""
    result = subprocess.run(
        [
            sys.executable, "-m", "lightning_sam.train", "-m", "experiment=mnist1d_label_noise", "sam=sam,none",
            f"data.data_dir={data_dir}", "trainer.accelerator=cpu", "trainer.max_epochs=2", "optimizer.lr=0.0",
            "scheduler=none", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "+trainer.enable_progress_bar=false", "callbacks.progress=null",
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "multirun" / "mnist1d_label_noise").glob("*/[01]"))
    assert len(runs) == 2 and result.stdout.count("test accuracy:") == 2
    for run in runs:
        # lr 0: val/acc never improves after epoch 0, yet last.ckpt must hold the last epoch
        last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert (last["epoch"], last["global_step"]) == (1, 4)


def test_step_milestones_beyond_the_run_are_warned_about(tmp_path, data_dir, caplog):
    from lightning_sam.app.checks import warn_unreached_milestones

    cfg = compose_cfg(tmp_path, data_dir, "scheduler=step")  # milestones 60, 120, 160; 30 epochs
    with caplog.at_level("WARNING", logger="lightning_sam.train"):
        warn_unreached_milestones(cfg, {"max_epochs": 30})
        warn_unreached_milestones(cfg, {"max_epochs": 200})
    assert [r.getMessage()[:40] for r in caplog.records] == ["scheduler.milestones=[60, 120, 160] are "]
