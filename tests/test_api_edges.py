"""Edges of the Python API: a disabled GradScaler, `only=` on frozen parameters, sparse gradients and complex
parameters (refused before training). Every RhoSchedule argument: tests/methods/test_schedule.py."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_sam import SAM, SAMLightningModule, sam_step
from tests.helpers import Classifier, SAMClassifier, Snapshots, assert_same_state, make_loader, state_copy, trainer


def _disabled_scaler() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_a_disabled_grad_scaler_counts_as_none():
    plain, sam = Classifier(), SAMClassifier(sam=SAM(0.0))
    for model in (plain, sam):
        trainer(max_epochs=2, plugins=[_disabled_scaler()]).fit(model, make_loader(batch_size=16))
    assert_same_state(state_copy(plain), state_copy(sam))  # rho 0 under the same plugin: bit for bit
    assert sam.sam_last_step is not None


class NaNAt(SAMClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 2 else loss


def test_a_skip_holds_without_a_scaler_that_would_drop_the_step():
    """A disabled scaler steps whatever the gradient: the skip must not rely on it (no NaN to drop)."""
    model, snapshots = NaNAt(sam=SAM(0.05)), Snapshots()
    t = trainer(max_steps=5, plugins=[_disabled_scaler()], callbacks=[snapshots])
    with pytest.warns(RuntimeWarning, match="skipped the update at global step 2"):
        t.fit(model, make_loader(batch_size=16))
    assert model.sam_skipped_steps == 1
    assert_same_state(snapshots.states[2][0], snapshots.states[3][0])
    assert all(torch.isfinite(v).all() for v in state_copy(model).values())
    assert not torch.equal(state_copy(model)["net.0.weight"], snapshots.states[3][0]["net.0.weight"])


def test_only_that_selects_frozen_parameters_alone_is_refused_before_training():
    model = SAMClassifier(sam=SAM(0.05, only=r"net\.0\."))
    model.net[0].requires_grad_(False)
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"`only='net\\\\.0\\\\.'` selects only frozen parameters"):
        trainer(max_steps=2).fit(model, make_loader(batch_size=16))
    assert_same_state(before, state_copy(model))


class SparseOrComplex(SAMLightningModule):
    def __init__(self, kind: str, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.embedding = nn.Embedding(10, 4, sparse=kind == "sparse")
        dtype = torch.complex64 if kind == "complex" else torch.float32
        self.w = nn.Parameter(torch.ones(4, dtype=dtype))

    def training_step(self, batch, batch_idx):
        return (self.embedding(batch[0]) * self.w).sum(-1).abs().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ManualSparse(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.embedding = nn.Embedding(10, 4, sparse=True)

    def training_step(self, batch, batch_idx):
        sam_step(self, self.optimizers(), lambda: self.embedding(batch[0]).sum(), SAM(0.05))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SparseOrComplex("sparse"), r"does not support sparse gradients: `Embedding\(10, 4, sparse=True\)`"),
        (lambda: SparseOrComplex("complex"), r"SAM does not support complex parameters: `w` is torch.complex64"),
        (lambda: ManualSparse(), r"SAM does not support sparse gradients"),
    ],
    ids=["sparse", "complex", "sam_step-sparse"],
)
def test_sparse_gradients_and_complex_parameters_are_refused_before_training(make, match):
    model = make()
    before = state_copy(model)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 10, (16,))), batch_size=4)
    with pytest.raises(TypeError, match=match):
        trainer(max_steps=2).fit(model, data)
    assert_same_state(before, state_copy(model))
