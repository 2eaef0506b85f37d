"""What the optimizer holds can change during fit: SAM follows it at every step.

Parameter groups added (``BackboneFinetuning``, ``add_param_group`` from a callback) or removed mid-fit,
``requires_grad`` flipped inside a group, and an optimizer swapped by a callback: with ``rho=0`` each run
equals plain Lightning bit for bit, with ``rho>0`` a late group is perturbed and checked like any other.
The Tuner's finders run the SAM step and leave the module as it was.
"""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, BatchSizeFinder, LearningRateFinder
from torch import nn
from torch.nn import functional as F

from lightning_sam import SAM, FriendlySAM, SAMLightningModule
from tests.helpers import Snapshots, assert_same_state, make_data, make_loader, state_copy, trainer


class Finetune(pl.LightningModule):
    """A backbone and a head; the optimizer takes the trainable parameters only (as BackboneFinetuning asks)."""

    def __init__(self, frozen_backbone: bool = False, all_in_optimizer: bool = False, lr: float = 0.1):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.lr, self.all_in_optimizer, self.calls = lr, all_in_optimizer, 0
        if frozen_backbone:
            self.backbone.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = F.cross_entropy(self.head(self.backbone(x)), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        # the head first, then the backbone: the same order as a group added later
        params = [*self.head.parameters(), *self.backbone.parameters()]
        if not self.all_in_optimizer:
            params = [p for p in params if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=5e-4)


class SAMFinetune(SAMLightningModule, Finetune):
    pass


class AddBackboneGroup(pl.Callback):
    """Unfreezes the backbone at ``epoch`` and adds it to the optimizer as a group of its own."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            pl_module.backbone.requires_grad_(True)
            params = list(pl_module.backbone.parameters())
            trainer.optimizers[0].add_param_group({"params": params})


class Unfreeze(pl.Callback):
    """Flips ``requires_grad`` of the backbone (already in the optimizer's group) on at epoch 1; then the head's off."""

    def __init__(self, freeze_head_at: int | None = 2):
        self.freeze_head_at = freeze_head_at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.backbone.requires_grad_(True)
        if trainer.current_epoch == self.freeze_head_at:
            pl_module.head.requires_grad_(False)


class RemoveGroup(pl.Callback):
    """Drops the backbone's group (the second) from the optimizer at epoch 2."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            optimizer = trainer.optimizers[0]
            for p in optimizer.param_groups.pop()["params"]:
                optimizer.state.pop(p, None)
            pl_module.backbone.requires_grad_(False)


class SwapOptimizer(pl.Callback):
    """Replaces the optimizer by another over the head only, at epoch 1 (as some schedules do)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.backbone.requires_grad_(False)
            trainer.strategy.optimizers = [torch.optim.Adam(pl_module.head.parameters(), lr=0.01)]


def _fit(module: pl.LightningModule, callbacks: list, epochs: int = 3) -> tuple[dict, list]:
    snapshots = Snapshots()
    t = trainer(max_epochs=epochs, callbacks=[*callbacks, snapshots])
    t.fit(module, make_loader(batch_size=24))
    return state_copy(module), t


CASES = {
    "backbone-finetuning": (
        dict(frozen_backbone=True),
        lambda: [BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5)],
    ),
    "add-param-group": (dict(frozen_backbone=True), lambda: [AddBackboneGroup(1)]),
    "requires-grad-flips": (dict(frozen_backbone=True, all_in_optimizer=True), lambda: [Unfreeze()]),
    "group-removed": (dict(frozen_backbone=True), lambda: [AddBackboneGroup(1), RemoveGroup()]),
    "optimizer-swapped": (dict(), lambda: [SwapOptimizer()]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rho_0_equals_plain_lightning_when_the_optimizer_changes_mid_fit(case):
    kwargs, callbacks = CASES[case]
    plain, plain_trainer = _fit(Finetune(**kwargs), callbacks())
    sam_module = SAMFinetune(sam=SAM(rho=0.0), **kwargs)
    sam, sam_trainer = _fit(sam_module, callbacks())
    assert plain_trainer.global_step == sam_trainer.global_step == 12
    assert_same_state(plain, sam)  # bit for bit
    assert sam_module.calls == 2 * sam_trainer.global_step  # every step a two-pass step
    plain_opt, sam_opt = plain_trainer.optimizers[0].state_dict(), sam_trainer.optimizers[0].state_dict()
    assert len(plain_opt["param_groups"]) == len(sam_opt["param_groups"])
    assert plain_opt["state"].keys() == sam_opt["state"].keys() and plain_opt["state"]
    for i, state in plain_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sam_opt["state"][i][key]), (i, key)


def test_a_group_added_mid_fit_is_perturbed_like_one_present_from_the_start():
    """The same parameters in a group added at epoch 1, or in the first group (frozen until epoch 1)."""
    late, _ = _fit(SAMFinetune(sam=SAM(rho=0.05), frozen_backbone=True), [AddBackboneGroup(1)])
    early_module = SAMFinetune(sam=SAM(rho=0.05), frozen_backbone=True, all_in_optimizer=True)
    early, _ = _fit(early_module, [Unfreeze(freeze_head_at=None)])
    plain, _ = _fit(Finetune(frozen_backbone=True), [AddBackboneGroup(1)])
    assert late.keys() == early.keys()
    for key, value in late.items():  # equal up to the order of float sums in ||g||
        torch.testing.assert_close(value, early[key], atol=1e-5, rtol=0, msg=key)
    assert not torch.allclose(late["backbone.0.weight"], plain["backbone.0.weight"], atol=1e-4)  # SAM did perturb


class NaNInLateGroup(SAMFinetune):
    """The backbone's gradient (a group added at epoch 1) is NaN in the perturbed pass of one step.

    The clean pass, its loss and e stay finite: only the check of the descent gradient can catch it.
    """

    nan_step = 6

    def training_step(self, batch, batch_idx):
        x, y = batch
        at_nan_step = self.trainer.global_step == self.nan_step
        self.passes_at_nan_step = getattr(self, "passes_at_nan_step", 0) + at_nan_step
        if not at_nan_step or self.passes_at_nan_step != 2:
            return super().training_step(batch, batch_idx)
        features = self.backbone[1:](_NaNGradient.apply(self.backbone[0](x)))
        return F.cross_entropy(self.head(features), y)


class _NaNGradient(torch.autograd.Function):
    """The identity, with a NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_a_nan_gradient_in_a_late_group_skips_the_step_with_nothing_changed():
    model = NaNInLateGroup(sam=SAM(rho=0.05), frozen_backbone=True)
    snapshots = Snapshots()
    t = trainer(max_epochs=3, callbacks=[AddBackboneGroup(1), snapshots])
    with pytest.warns(RuntimeWarning, match="skipped the update at global step 6"):
        t.fit(model, make_loader(batch_size=24))
    assert model.sam_skipped_steps == 1
    (before, opt_before), (after, opt_after) = snapshots.states[6], snapshots.states[7]
    assert_same_state(before, after)  # weights and BatchNorm statistics
    assert opt_before["state"].keys() == opt_after["state"].keys() and len(opt_before["state"]) == 8  # both groups
    for i, state in opt_before["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_after["state"][i][key]), (i, key)
    final = state_copy(model)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert not torch.equal(final["backbone.0.weight"], after["backbone.0.weight"])  # later steps train on


# ---------------------------------------------------------------------------------------------- the Tuner


class Counting(pl.LightningModule):
    """A classifier that records the size of every batch its training_step sees."""

    def __init__(self, lr: float = 0.1, batch_size: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.lr, self.batch_size, self.seen = lr, batch_size, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(len(x))
        return F.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(make_data(n=192), batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SAMCounting(SAMLightningModule, Counting):
    pass


def _sam_state(model: SAMLightningModule) -> tuple:
    return model.sam_skipped_steps, copy.deepcopy(model.sam.state_dict())


@pytest.mark.parametrize("how", ["tuner", "callback"])
def test_lr_find_runs_the_sam_step_and_restores_the_module(how):
    results = {}
    for name, model in (("plain", Counting()), ("rho0", SAMCounting(sam=SAM(0.0))), ("sam", SAMCounting())):
        before = state_copy(model)
        if how == "tuner":
            finder = pl.tuner.Tuner(trainer()).lr_find(model, num_training=12, min_lr=1e-4, update_attr=False)
            assert_same_state(before, state_copy(model))  # the initial weights and BatchNorm statistics are back
        else:
            callback = LearningRateFinder(num_training_steps=12, min_lr=1e-4, update_attr=False)
            trainer(max_steps=1, callbacks=[callback]).fit(model)
            finder = callback.optimal_lr
        results[name] = (model.seen[:24], finder.results["loss"])
        assert len(finder.results["loss"]) == 12
    plain_seen, plain_loss = results["plain"]
    assert plain_seen[:12] == [8] * 12 and len(results["plain"][0]) >= 12
    for name in ("rho0", "sam"):
        assert results[name][0] == [8] * 24  # two passes per step: 12 steps, 24 training_step calls
    assert results["rho0"][1] == plain_loss  # rho 0: the finder saw exactly plain SGD's losses
    assert results["sam"][1][1:] != plain_loss[1:]  # rho 0.05: SAM's own losses from the second step on


def test_lr_find_leaves_the_method_state_as_it_was():
    model = SAMCounting(sam=FriendlySAM(rho=0.05))  # FriendlySAM keeps a moving average m between steps
    trainer(max_steps=2).fit(model)
    before, sam_before = state_copy(model), _sam_state(model)
    assert sam_before[1]["m"] is not None
    trainer_ = trainer(max_steps=2)
    pl.tuner.Tuner(trainer_).lr_find(model, num_training=6, update_attr=False)
    assert_same_state(before, state_copy(model))
    skipped, state = _sam_state(model)
    assert skipped == sam_before[0]
    assert state["m"]["index"] == sam_before[1]["m"]["index"] == list(range(6))  # every parameter's m
    for a, b in zip(state["m"]["values"], sam_before[1]["m"]["values"], strict=True):
        assert torch.equal(a, b)


def test_batch_size_finder_runs_the_sam_step_and_restores_the_module():
    seen = {}
    for cls in (Counting, SAMCounting):
        model = cls(batch_size=2)
        before = state_copy(model)
        finder = BatchSizeFinder(mode="power", steps_per_trial=2, init_val=2, max_trials=3)
        t = trainer(max_steps=1, callbacks=[finder])
        t.fit(model)
        seen[cls] = (model.seen, finder.optimal_batch_size)
        after_finder = state_copy(model)  # after the fit's one step
        assert not all(torch.equal(v, before[k]) for k, v in after_finder.items())
    (plain_seen, plain_size), (sam_seen, sam_size) = seen[Counting], seen[SAMCounting]
    assert plain_size == sam_size and len(set(plain_seen)) >= 3  # several trial sizes
    assert sam_seen == [b for b in plain_seen for _ in range(2)]  # each step of each trial: two passes


class AddGroupMidWindow(pl.Callback):
    """Adds the backbone's group before batch ``at_batch`` of the first epoch (3: a window's second micro-batch)."""

    def __init__(self, at_batch: int):
        self.at_batch = at_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.at_batch:
            pl_module.backbone.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.backbone.parameters())})


@pytest.mark.parametrize("at_batch", [2, 3], ids=["window-start", "mid-window"])
def test_a_group_added_between_micro_batches_is_followed(at_batch):
    runs = {}
    modules = {"plain": Finetune(frozen_backbone=True), "sam": SAMFinetune(sam=SAM(0.0), frozen_backbone=True)}
    for name, module in modules.items():
        t = trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[AddGroupMidWindow(at_batch)])
        t.fit(module, make_loader(batch_size=24))
        runs[name] = state_copy(module)
    assert_same_state(runs["plain"], runs["sam"])


class StepsSeen(SAMCounting):
    def training_step(self, batch, batch_idx):
        self.steps.append(self.trainer.global_step)
        return super().training_step(batch, batch_idx)


def test_the_first_trial_step_of_a_finder_is_a_whole_sam_step():
    """Lightning calls optimizer_step before training_step: the finder's first step must bind there already."""
    model = StepsSeen(sam=SAM(0.05, interval=2))
    model.steps = []
    pl.tuner.Tuner(trainer()).lr_find(model, num_training=4, update_attr=False)
    assert model.steps == [0, 0, 1, 2, 2, 3]  # SAM steps (two passes) at 0 and 2, plain steps at 1 and 3


def test_only_on_a_backbone_frozen_until_backbone_finetuning_unfreezes_it():
    class Counted(SAMFinetune):
        def training_step(self, batch, batch_idx):
            self.seen.append(self.trainer.global_step)
            return super().training_step(batch, batch_idx)

    model = Counted(sam=SAM(0.05, only=r"^backbone\.[03]\."), frozen_backbone=True)  # its linear layers
    model.seen = []
    callback = BackboneFinetuning(unfreeze_backbone_at_epoch=1, train_bn=False)
    trainer(max_epochs=2, callbacks=[callback]).fit(model, make_loader(batch_size=24))
    assert model.seen == [0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7]  # one pass while the backbone is frozen, then two
