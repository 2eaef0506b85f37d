"""Checkpoints written by lightning-sam 0.2.0 (tests/fixtures/v0_2, made by make_v0_2_checkpoints.py with that
version) load and resume bit for bit with the current code, for every method; new checkpoints keep the format."""

from pathlib import Path

import pytest
import torch

from tests.fixtures.make_v0_2_checkpoints import METHODS
from tests.helpers import SAMClassifier, assert_same_state, make_loader, state_copy, trainer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v0_2"
FIXTURES_TORCH = "2.13."  # the torch the fixtures were written with


@pytest.mark.parametrize("name", list(METHODS))
def test_a_0_2_checkpoint_resumes_bit_for_bit(name, tmp_path):
    ckpt = FIXTURES / f"{name}.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 6 and saved["lightning_sam"]["config"]["class_path"].startswith("lightning_sam.")
    model = SAMClassifier(sam=METHODS[name]())
    trainer(max_epochs=3).fit(model, make_loader(batch_size=16), ckpt_path=ckpt)
    # bit for bit with the torch that wrote the fixtures; other torch builds round some kernels differently
    atol = 0.0 if torch.__version__.startswith(FIXTURES_TORCH) else 1e-6
    assert_same_state(torch.load(FIXTURES / f"{name}.final.pt", weights_only=True), state_copy(model), atol=atol)
    # what a checkpoint of today holds about the method: the same plain data as in 0.2.0
    path = tmp_path / "now.ckpt"
    model.trainer.save_checkpoint(path)
    now = torch.load(path, map_location="cpu", weights_only=True)["lightning_sam"]
    assert now["config"] == saved["lightning_sam"]["config"]
    assert now["method"].keys() == saved["lightning_sam"]["method"].keys()
    assert now.keys() == saved["lightning_sam"].keys()


def test_method_objects_pickled_by_earlier_versions_load_with_weights_only():
    """0.1 checkpoints held the method objects themselves (as `lightning_sam.methods.SAM`, ...) in their hparams."""
    from lightning_sam import ASAM, GSAM, SAM, LookSAM, RhoSchedule

    held = torch.load(FIXTURES / "methods_pickled.pt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert held == {
        "sam": SAM(0.05, interval=2, rho_schedule=RhoSchedule("cosine", total_steps=100, rho_min=0.01)),
        "asam": ASAM(0.5, 0.01),
        "gsam": GSAM(0.05, 0.1),
        "looksam": LookSAM(0.05, k=5, alpha=0.7),
    }
    assert repr(held["asam"]) == "ASAM(rho=0.5, eta=0.01)"
