"""The contract every registered method keeps, run over the registry: a new method gets these tests by being registered.

For each method: its app config; its limit that is exactly SAM, where it has one; a checkpoint round trip of its
state; a skipped step that leaves weights, buffers and optimizer state as before (and no non-finite value in the
method's state); an exact resume at an epoch boundary (and, for a method with state, a different run without it);
the same method under ``sam_step``.
"""

import copy
import math
from dataclasses import fields
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from lightning_sam import SAM, sam_step
from lightning_sam.methods import REGISTRY, method_from_config, method_to_config
from tests.helpers import SAMClassifier, Snapshots, assert_same_state, make_data, make_loader, state_copy, trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sam"

#: The arguments with which each method is exactly SAM (``None``: no such limit: ASAM scales by the weights).
SAM_LIMIT = {
    "sam": {},
    "asam": None,
    "gsam": {"alpha": 0.0},
    "looksam": {"k": 1},
    "late_phase": {"start": 0},
    "aesam": {"c": -math.inf},
    "fsam": {"sigma": 0.0},
    "msam": None,  # along the momentum: no exact SAM limit
    "rwp": None,  # random: no exact SAM limit
}

#: Arguments that make a short test run exercise the method (plain and SAM steps within a few steps).
SHORT_RUN = {"looksam": {"k": 4}, "late_phase": {"start": 3}, "aesam": {"c": 0.0}, "msam": {"rho": 0.5},
             "rwp": {"eta": 0.1}}  # fmt: skip

NAMES = sorted(REGISTRY)


def make(name: str, **kwargs):
    return REGISTRY[name](**{**SHORT_RUN.get(name, {}), **kwargs})


def test_every_registered_method_has_its_config_and_a_declared_limit():
    assert set(SAM_LIMIT) == set(REGISTRY)  # a new method says whether it has an exact SAM limit
    assert {p.stem for p in CONFIGS.glob("*.yaml")} - {"none"} == set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert cls.name == name
        node = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=False)
        assert node.pop("_target_") == f"lightning_sam.{cls.__name__}"
        assert set(node) <= {f.name for f in fields(cls)}, name  # every key is a setting of the method


@pytest.mark.parametrize("name", [n for n in NAMES if SAM_LIMIT[n] is not None])
def test_the_limit_is_exactly_sam(name):
    runs = {}
    for label, method in (("sam", SAM(0.05)), (name, REGISTRY[name](0.05, **SAM_LIMIT[name]))):  # type: ignore[arg-type]
        model = SAMClassifier(sam=method)
        trainer(max_epochs=2).fit(model, make_loader(batch_size=16))
        runs[label] = state_copy(model)
    assert_same_state(runs["sam"], runs[name])


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


@pytest.mark.parametrize("name", NAMES)
def test_the_state_round_trips_a_checkpoint(name):
    method = make(name)
    model = SAMClassifier(sam=method)
    t = trainer(max_steps=6)
    t.fit(model, make_loader(batch_size=16))
    state = copy.deepcopy(method.state_dict())
    fresh = method_from_config(method_to_config(method))
    assert fresh == method and fresh is not method
    fresh.load_state_dict(copy.deepcopy(state))  # before binding, as on_load_checkpoint does
    fresh.bind_([p for g in t.optimizers[0].param_groups for p in g["params"]])
    assert _state_equal(fresh.state_dict(), state)
    assert all(torch.isfinite(x).all() for x in _tensors(state))


class NaNAt(SAMClassifier):
    """The clean loss is NaN at one step."""

    def __init__(self, at: int, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == self.at else loss


@pytest.mark.parametrize("name", NAMES)
def test_a_skipped_step_leaves_everything_as_before(name):
    model, snapshots = NaNAt(4, sam=make(name)), Snapshots()
    with pytest.warns(RuntimeWarning, match="skipped the update at global step 4"):
        trainer(max_epochs=2, max_steps=7, callbacks=[snapshots]).fit(model, make_loader(batch_size=16))
    assert model.sam_skipped_steps == 1
    (before, opt_before), (after, opt_after) = snapshots.states[4], snapshots.states[5]
    assert_same_state(before, after)  # weights and BatchNorm statistics
    assert _state_equal(opt_before, opt_after) and opt_before["state"]  # momentum untouched
    assert all(torch.isfinite(x).all() for x in _tensors(model.sam.state_dict()))  # no NaN kept by the method
    assert not _state_equal(snapshots.states[6][0], after)  # training goes on


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_at_an_epoch_boundary_is_exact(name, tmp_path):
    loader = make_loader(batch_size=16)  # 6 steps an epoch

    def run(ckpt_path=None, drop_state=False):
        model = SAMClassifier(sam=make(name))
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
        if ckpt_path and drop_state:
            saved = torch.load(ckpt_path, weights_only=True)
            saved["lightning_sam"]["method"] = {}
            ckpt_path = tmp_path / "dropped.ckpt.bak"
            torch.save(saved, ckpt_path)
        trainer(max_epochs=3, enable_checkpointing=True, callbacks=[ckpt]).fit(model, loader, ckpt_path=ckpt_path)
        return state_copy(model)

    full = run()
    boundary = tmp_path / "epoch=0-step=6.ckpt"
    assert_same_state(full, run(boundary))
    if _tensors(torch.load(boundary, weights_only=True)["lightning_sam"]["method"]):  # the state matters
        without = run(boundary, drop_state=True)
        assert not torch.equal(without["net.0.weight"], full["net.0.weight"])


class Manual(pl.LightningModule):
    def __init__(self, method):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.net, self.method = (
            torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)),
            method,
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        sam_step(self, self.optimizers(), lambda: torch.nn.functional.cross_entropy(self.net(x), y), self.method)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("name", NAMES)
def test_it_runs_under_sam_step(name):
    model = Manual(make(name))
    before = state_copy(model)
    t = trainer(max_steps=6)
    t.fit(model, torch.utils.data.DataLoader(make_data(), batch_size=16))
    assert t.global_step == 6 and model.method.state is not None
    after = state_copy(model)
    assert all(torch.isfinite(v).all() for v in after.values()) and not torch.equal(
        after["net.0.weight"], before["net.0.weight"]
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_fabric_and_plain_pytorch_front_ends_take_the_mixins_steps(name):
    from lightning.fabric import Fabric

    from lightning_sam.fabric import sam_step as fabric_sam_step
    from lightning_sam.optim import SAM as PlainSAM
    from tests.helpers import make_net

    loader = make_loader(batch_size=16)
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(1)  # RWP's noise
    model = SAMClassifier(sam=make(name))
    trainer(max_epochs=1).fit(model, loader)

    torch.manual_seed(1)
    net, method = make_net(), make(name)
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric_model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), **sgd))
    for x, y in loader:
        loss = lambda x=x, y=y: torch.nn.functional.cross_entropy(fabric_model(x), y)  # noqa: E731
        fabric_sam_step(fabric, fabric_model, optimizer, loss, method)

    torch.manual_seed(1)
    plain = make_net()
    opt = PlainSAM(plain.parameters(), torch.optim.SGD, method=make(name), module=plain, **sgd)
    for x, y in loader:

        def closure(x=x, y=y):
            loss = torch.nn.functional.cross_entropy(plain(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    for key, value in state_copy(model.net).items():
        torch.testing.assert_close(net.state_dict()[key], value, atol=1e-6, rtol=0, msg=f"fabric {key}")
        torch.testing.assert_close(plain.state_dict()[key], value, atol=1e-6, rtol=0, msg=f"plain {key}")
