"""SAMLightningModule: a LightningModule mixin that trains with the two-pass SAM step.

The mixin only orchestrates; the perturbation math lives in :mod:`lightning_sam.methods`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from typing_extensions import override

from lightning_sam.methods import SAM, ParamGroup, WeightBackup, check_non_negative, global_norm, local

__all__ = ["SAMLightningModule", "SAMStepStats"]

# Lightning looks these hooks up on the instance. The mixin shadows them there with wrappers that run
# the SAM logic around the user's own definition, wherever that sits in the MRO: this works both with
# the mixin first (`class M(SAMLightningModule, Existing)`) and as the only base.
_WRAPPED_HOOKS = (
    "training_step",
    "configure_optimizers",
    "on_before_optimizer_step",
    "on_train_epoch_end",
    "on_validation_end",
    "on_save_checkpoint",
    "on_load_checkpoint",
)
_CHECKPOINT_KEY = "lightning_sam"
_CLIP_ALGORITHMS = ("norm", "value")


class SAMStepStats(NamedTuple):
    """What the last SAM step measured, as 0-dim tensors on the model's device (no host sync).

    With ``accumulate_grad_batches > 1`` these are the last micro-batch's figures.
    """

    loss: Tensor
    """L(w), the clean loss."""
    perturbed_loss: Tensor
    """L(w + e), the loss at the perturbed weights."""
    grad_norm: Tensor
    """||g|| of the clean gradient, unscaled under AMP (for ASAM: ||T g||)."""
    eps_norm: Tensor
    """||e||, the length of the ascent step (at most rho)."""
    rho: float
    """The method's rho."""

    @property
    def sharpness(self) -> Tensor:
        """L(w + e) - L(w)."""
        return self.perturbed_loss - self.loss

    def as_dict(self) -> dict[str, Tensor | float]:
        """The figures under their logged names."""
        return {
            "sam/sharpness": self.sharpness,
            "sam/perturbed_loss": self.perturbed_loss,
            "sam/eps_norm": self.eps_norm,
            "sam/grad_norm": self.grad_norm,
            "sam/rho": self.rho,
        }


SKIPPED_STEPS_KEY = "sam/skipped_steps"


class SAMLightningModule(pl.LightningModule):
    """Trains a LightningModule with Sharpness-Aware Minimization.

    Put it first among the bases of an existing LightningModule (or use it as the only base). Write
    ``training_step`` as for automatic optimization: return the loss (a tensor, or a dict with
    ``"loss"``). ``configure_optimizers`` returns your ordinary optimizer and scheduler. Each
    training step then runs:

    1. the clean pass at ``w`` and its backward (under DDP without gradient all-reduce, so each
       replica computes its own ``e``, as in the paper);
    2. ``e(w)`` from the gradients (``sam``); ``w <- w + e``;
    3. the perturbed pass at ``w + e``, with BatchNorm running statistics frozen, nothing logged and
       no torchmetrics updated (what ``training_step`` logs counts once, from the clean pass);
    4. ``w`` restored bit for bit from a saved copy;
    5. gradient clipping (this module's ``gradient_clip_val``) on unscaled gradients;
    6. one ``LightningOptimizer.step()`` with the perturbed gradient, then the LR schedulers as
       Lightning's automatic loop would step them.

    A step with a non-finite loss or gradient in either pass is skipped: weights, buffers and
    optimizer state stay as they were, ``global_step`` advances, and ``sam/skipped_steps`` counts it.
    An exception inside the step (the optimizer's included, if raised before it writes) leaves weights and
    buffers as they were before it, then propagates.

    Args:
        sam: the perturbation rule, :class:`~lightning_sam.SAM` (default ``SAM(rho=0.05)``) or
            :class:`~lightning_sam.ASAM`.
        accumulate_grad_batches: micro-batches per optimizer step (``Trainer(accumulate_grad_batches)``
            is not available in manual optimization). Each micro-batch gets its own ``e``; the
            perturbed gradients (losses divided by this number) add up; the descent backward of the
            last micro-batch alone synchronizes gradients under DDP.
        gradient_clip_val: clip the descent gradient before the optimizer step (``None`` or ``0``: off).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        sync_perturbation: under DDP, compute ``e`` from the gradient averaged over all replicas
            (one global ``e``, a second all-reduce per step). The default, ``False``, gives each
            replica its own ``e`` from its own batch, as in the paper and its code (m-sharpness with
            m the per-device batch), and all-reduces once per step.
        *args, **kwargs: passed on to the next class in the MRO.

    Example::

        >>> import torch, lightning.pytorch as pl
        >>> from lightning_sam import SAM, SAMLightningModule
        >>> class Regression(pl.LightningModule):
        ...     def __init__(self, lr: float = 0.1):
        ...         super().__init__()
        ...         self.lr, self.net = lr, torch.nn.Linear(4, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         loss = torch.nn.functional.mse_loss(self.net(x), y)
        ...         self.log("train/loss", loss)
        ...         return loss
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        >>> class SAMRegression(SAMLightningModule, Regression):
        ...     pass
        >>> model = SAMRegression(sam=SAM(rho=0.05), lr=0.05)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
        >>> trainer.global_step
        4
    """

    def __init__(
        self,
        *args: Any,
        sam: SAM | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        sync_perturbation: bool = False,
        **kwargs: Any,
    ) -> None:
        if sam is None:
            sam = SAM()
        if not isinstance(sam, SAM):
            raise TypeError(
                "Expected `sam` to be a method object (SAM, ASAM, GSAM, LookSAM) or None for SAM(rho=0.05), "
                f"got {sam!r}."
            )
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int):
            raise TypeError(f"Expected `accumulate_grad_batches` to be an int >= 1, got {accumulate_grad_batches!r}.")
        if accumulate_grad_batches < 1:
            raise ValueError(f"Expected `accumulate_grad_batches` to be an int >= 1, got {accumulate_grad_batches}.")
        if gradient_clip_val is not None:
            gradient_clip_val = check_non_negative("gradient_clip_val", gradient_clip_val)
        if gradient_clip_algorithm not in _CLIP_ALGORITHMS:
            raise ValueError(
                f"Expected `gradient_clip_algorithm` to be one of {_CLIP_ALGORITHMS}, got {gradient_clip_algorithm!r}."
            )
        if not isinstance(sync_perturbation, bool):
            raise TypeError(f"Expected `sync_perturbation` to be True or False, got {sync_perturbation!r}.")
        if accumulate_grad_batches > 1 and sam.uses_clean_gradient:
            raise ValueError(
                f"{type(sam).__name__} combines the clean and perturbed gradients of one batch; it does not support "
                f"`accumulate_grad_batches={accumulate_grad_batches}`. Use a larger batch, or SAM/ASAM."
            )
        super().__init__(*args, **kwargs)
        self.sam = sam
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.sync_perturbation = sync_perturbation
        self.sam_last_step: SAMStepStats | None = None
        self.sam_skipped_steps = 0
        self._sam_weights = WeightBackup()
        self._sam_buffers = _BufferBackup()
        self._sam_nonfinite: Tensor | None = None  # any non-finite figure since the last update
        self._sam_accumulated = _Accumulated()  # descent gradients of the earlier micro-batches
        self._sam_muted = False  # inside the perturbed pass: logging off
        self._sam_schedulers: list[LRSchedulerConfig] = []
        self._sam_plateau_due: list[LRSchedulerConfig] = []  # per-step plateau schedulers to step next
        self._sam_epoch_done = False  # the epoch's last batch has run (its epoch schedulers are due)
        self._sam_layout: _ModuleLayout | None = None  # found at the first step of each fit
        for name in _WRAPPED_HOOKS:
            object.__setattr__(self, name, getattr(self, f"_sam_{name}"))

    # ------------------------------------------------------------------ Lightning's switches
    @property
    @override
    def automatic_optimization(self) -> bool:
        """Always ``False``: the mixin runs the optimizer itself, twice-forward, once-step."""
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError(
                "SAMLightningModule runs its own two-pass step with manual optimization; "
                "`automatic_optimization` cannot be set to True."
            )

    @property  # type: ignore[override]
    @override
    def trainer(self) -> pl.Trainer:
        return pl.LightningModule.trainer.fget(self)  # type: ignore[attr-defined]

    @trainer.setter
    def trainer(self, trainer: pl.Trainer | None) -> None:
        # Attached before Lightning validates its loop configuration, so our errors come first.
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._sam_check_trainer(trainer)
            if not any(isinstance(c, _PlateauClock) for c in trainer.callbacks):
                trainer.callbacks.insert(0, _PlateauClock())
        pl.LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]

    def _sam_check_trainer(self, trainer: pl.Trainer) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                f"`Trainer(gradient_clip_val={trainer.gradient_clip_val})` is not available with SAMLightningModule "
                "(Lightning disables it in manual optimization). Pass it to the module instead: "
                f"`{type(self).__name__}(..., gradient_clip_val={trainer.gradient_clip_val}, "
                f"gradient_clip_algorithm={str(trainer.gradient_clip_algorithm or 'norm')!r})`."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"`Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches})` is not available with "
                "SAMLightningModule (Lightning disables it in manual optimization). Pass it to the module instead: "
                f"`{type(self).__name__}(..., accumulate_grad_batches={trainer.accumulate_grad_batches})`."
            )
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "SAMLightningModule cannot run under FSDPStrategy: FSDP v1 has no manual optimization in Lightning. "
                "Use FSDP2: `Trainer(strategy=ModelParallelStrategy())` with "
                "`torch.distributed.fsdp.fully_shard` applied in `configure_model`."
            )
        if isinstance(trainer.strategy, ModelParallelStrategy) and not self.sync_perturbation:
            rank_zero_warn(
                "Under ModelParallelStrategy (FSDP2) every backward reduce-scatters the gradients, so SAM's e "
                "comes from the gradient averaged over replicas, as with `sync_perturbation=True`."
            )
        if getattr(trainer.strategy, "_ddp_kwargs", {}).get("static_graph") and not self.sync_perturbation:
            raise ValueError(
                "`DDPStrategy(static_graph=True)` cannot skip the all-reduce of SAM's ascent backward (each "
                "replica its own e). Drop `static_graph=True`, or pass `sync_perturbation=True` to the module "
                "(one e from the averaged gradient, two all-reduces per step)."
            )
        if type(self).training_step is pl.LightningModule.training_step:
            raise TypeError(
                f"`{type(self).__name__}` defines no `training_step`. SAMLightningModule needs one that returns "
                "the loss (a tensor, or a dict with a 'loss' key)."
            )

    @override
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``, silent during the perturbed pass (so each step logs once)."""
        if not self._sam_muted:
            super().log(name, value, *args, **kwargs)

    # ------------------------------------------------------------------ wrapped hooks
    def _sam_configure_optimizers(self) -> Any:
        conf = type(self).configure_optimizers(self)
        optimizers, schedulers, monitor = _configure_optimizers(conf)
        if len(optimizers) != 1:
            raise ValueError(
                f"SAMLightningModule needs exactly one optimizer from `configure_optimizers`, got {len(optimizers)}. "
                "Put all parameters in one optimizer; param groups can differ in lr, weight_decay and `rho`."
            )
        for i, group in enumerate(optimizers[0].param_groups):
            if "rho" in group:
                check_non_negative(f"param_groups[{i}]['rho']", group["rho"])
        # Parsed as in automatic optimization, to keep `monitor`/`strict` of ReduceLROnPlateau, which
        # Lightning drops (with a warning) in manual optimization. The mixin steps them itself.
        self._sam_schedulers = _configure_schedulers_automatic_opt(schedulers, monitor)
        self._sam_layout, self._sam_plateau_due, self._sam_epoch_done = None, [], False  # a new fit
        if not schedulers:
            return conf
        return optimizers, [
            {"scheduler": c.scheduler, "interval": c.interval, "frequency": c.frequency, "name": c.name}
            for c in self._sam_schedulers
        ]

    def _sam_on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The order of automatic optimization: the hook sees the unclipped gradient, then clipping.
        # Under 16-mixed, Lightning has unscaled the gradients before this hook.
        type(self).on_before_optimizer_step(self, optimizer)
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def _sam_on_train_epoch_end(self) -> None:
        type(self).on_train_epoch_end(self)
        if self._sam_epoch_done:  # as Lightning: not when the epoch ended early (max_steps)
            self._sam_epoch_done = False
            self._sam_step_configs(self._sam_due_schedulers("epoch", plateau=True))

    def _sam_on_validation_end(self) -> None:
        type(self).on_validation_end(self)
        self._sam_step_plateau_due()  # after a validation inside the epoch, as Lightning does

    def _sam_on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        type(self).on_save_checkpoint(self, checkpoint)
        checkpoint[_CHECKPOINT_KEY] = {"method": self.sam.state_dict(), "skipped_steps": self.sam_skipped_steps}

    def _sam_on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        type(self).on_load_checkpoint(self, checkpoint)
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is not None:
            self.sam.load_state_dict(state["method"])
            self.sam_skipped_steps = state["skipped_steps"]

    def _sam_training_step(self, *args: Any, **kwargs: Any) -> Any:
        user_step = type(self).training_step
        if self._trainer is None or not self._trainer.training:
            return user_step(self, *args, **kwargs)
        if self._sam_layout is None:
            self._sam_layout = _ModuleLayout.of(self)
        if not self._sam_layout.step_takes_batch_idx:
            args = args[:1]  # Lightning passed batch_idx because this wrapper takes *args
        try:
            return self._sam_step(user_step, args, kwargs)
        except BaseException:
            # Nothing is lost: weights and buffers go back to where this update started.
            self._sam_weights.restore_()
            self._sam_buffers.restore_()
            if self.sam.takes_sam_step(self.trainer.global_step):
                self.sam.skip_()
            self._sam_reset_update()
            raise

    # ------------------------------------------------------------------ the step
    def _sam_step(self, user_step: Any, args: tuple, kwargs: dict) -> Any:
        trainer, method, n = self.trainer, self.sam, self.accumulate_grad_batches
        optimizer = self.optimizers()
        epoch_loop = trainer.fit_loop.epoch_loop
        batch_idx = epoch_loop.batch_idx
        last_of_epoch = epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        first = batch_idx % n == 0
        update = (batch_idx + 1) % n == 0 or last_of_epoch
        sam_step = method.takes_sam_step(trainer.global_step)  # the same for all micro-batches of an update
        if first:
            self._sam_buffers.save_(self._sam_layout.buffers)
            optimizer.zero_grad()

        # 1. clean pass at w. On a SAM step its gradient stays local to this replica (each its own e)
        # unless e is synchronized or the method's descent needs the clean gradient; on a plain step
        # it is the descent gradient.
        sync = (self.sync_perturbation or method.uses_clean_gradient) if sam_step else update
        with nullcontext() if sync else _no_sync(trainer.strategy):
            output = user_step(self, *args, **kwargs)
            loss = _loss_of(output)
            self.manual_backward(loss / n if n > 1 and not sam_step else loss)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        shards = local(grads)  # in-place work on FSDP2's local shards; plain tensors otherwise

        if sam_step:
            perturbed_loss = self._sam_ascent_descent(
                user_step, args, kwargs, optimizer, loss, params, grads, shards, update
            )
            nonfinite = ~(loss.isfinite() & perturbed_loss.isfinite() & global_norm(grads).isfinite())
        else:
            grad_norm = global_norm(grads)
            if update:
                method.plain_descent_(grads, grad_norm)
            nonfinite = ~(loss.isfinite() & grad_norm.isfinite())
        self._sam_nonfinite = nonfinite if self._sam_nonfinite is None else self._sam_nonfinite | nonfinite

        if not update:
            if sam_step:  # keep this micro-batch's descent gradient aside; the next clean one starts at 0
                self._sam_accumulated.save_(params, shards)
                torch._foreach_zero_(shards)
            return output

        # 5.-6. one optimizer step per update; the clipping runs in on_before_optimizer_step.
        # The step's one host sync; under DDP every replica skips if any must, so weights stay equal.
        if trainer.strategy.reduce_boolean_decision(bool(self._sam_nonfinite), all=False):
            self._sam_skip_update(optimizer.optimizer, shards)
            if sam_step:
                method.skip_()
        optimizer.step()
        self._sam_reset_update()
        self._sam_step_configs(self._sam_due_schedulers("step", plateau=False))
        plateau_due = self._sam_due_schedulers("step", plateau=True)
        if plateau_due and trainer.enable_validation:  # Lightning steps these after a validation that may follow
            self._sam_plateau_due = plateau_due
        else:
            self._sam_step_configs(plateau_due)
        if last_of_epoch:
            self._sam_step_configs(self._sam_due_schedulers("epoch", plateau=False))
            self._sam_epoch_done = True
        if trainer._logger_connector.should_update_logs:
            self.log(SKIPPED_STEPS_KEY, float(self.sam_skipped_steps), on_step=True, on_epoch=False)
        return output

    def _sam_ascent_descent(
        self,
        user_step: Any,
        args: tuple,
        kwargs: dict,
        optimizer: Any,
        loss: Tensor,
        params: list[Tensor],
        grads: list[Tensor],
        shards: list[Tensor],
        update: bool,
    ) -> Tensor:
        """Steps 2-4 of a SAM step: e(w), the perturbed pass at w + e, w restored; returns L(w + e)."""
        method, n = self.sam, self.accumulate_grad_batches
        method.clean_gradient_(grads)
        rho = method.rho_at(self.trainer.global_step, optimizer.param_groups[0]["lr"])
        groups = self._sam_param_groups(optimizer.optimizer, rho)
        # 2. e(w) from g; w <- w + e
        grad_norm, eps_norm, scales = method.ascent_(groups)
        self._sam_weights.perturb_(groups, scales)
        try:
            # the descent gradient adds to those of the earlier micro-batches
            self._sam_accumulated.load_(params, shards)
            # 3. perturbed pass at w + e
            with self._sam_perturbed_pass(), nullcontext() if update else _no_sync(self.trainer.strategy):
                perturbed_loss = _loss_of(user_step(self, *args, **kwargs))
                self.manual_backward(perturbed_loss / n if n > 1 else perturbed_loss)
        finally:
            # 4. w <- saved w, bit for bit
            self._sam_weights.restore_()
        method.descent_(grads)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            grad_norm = grad_norm / scaler._get_scale_async()
        self.sam_last_step = SAMStepStats(loss.detach(), perturbed_loss.detach(), grad_norm, eps_norm, rho)
        return perturbed_loss

    def _sam_skip_update(self, optimizer: torch.optim.Optimizer, grads: list[Tensor]) -> None:
        """Make the coming ``optimizer.step()`` change nothing, and put the buffers back."""
        self._sam_buffers.restore_()
        self.sam_skipped_steps += 1
        if self.sam_skipped_steps == 1:
            warnings.warn(
                f"SAM skipped the update at global step {self.trainer.global_step}: a loss or gradient was not "
                "finite. Weights, buffers and optimizer state are unchanged; later skips are counted in "
                f"`{SKIPPED_STEPS_KEY}` without a warning.",
                RuntimeWarning,
                stacklevel=2,
            )
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None and grads:
            # GradScaler skips the step on a non-finite gradient and lowers its scale.
            grads[0].fill_(float("nan"))
        else:
            # torch's optimizers leave parameters without a gradient untouched.
            optimizer.zero_grad(set_to_none=True)

    def _sam_reset_update(self) -> None:
        self._sam_nonfinite = None
        self._sam_accumulated.discard()
        self._sam_weights.discard()
        self._sam_buffers.discard()

    def _sam_param_groups(self, optimizer: torch.optim.Optimizer, rho: float) -> list[ParamGroup]:
        """The groups to perturb at this step: their rho (scheduled), and their selected parameters with gradients."""
        assert self._sam_layout is not None
        selected = self._sam_layout.selected
        scale = rho / self.sam.rho if self.sam.rho else 1.0  # a schedule scales every group's rho alike
        groups = []
        for group in optimizer.param_groups:
            # a group with rho 0 is not perturbed, but its gradient counts in the global ||g||
            group_rho = group.get("rho", self.sam.rho) * scale
            params = [p for p in group["params"] if p.grad is not None and (selected is None or id(p) in selected)]
            if params:
                groups.append(ParamGroup(group_rho, params, [p.grad for p in params]))
        return groups

    @contextmanager
    def _sam_perturbed_pass(self) -> Iterator[None]:
        """Running statistics frozen, logging muted, torchmetrics states restored afterwards."""
        assert self._sam_layout is not None
        norms, metrics, stats = self._sam_layout.norms, self._sam_layout.metrics, self._sam_layout.other_stats
        saved_metrics = _save_metric_states(metrics)
        saved_stats = torch._foreach_clone(stats) if stats else []
        self._sam_muted = True
        for m in norms:
            m.track_running_stats = False  # batch statistics, running ones untouched
        try:
            yield
        finally:
            for m in norms:
                m.track_running_stats = True
            if stats:  # InstanceNorm and the like update them whatever track_running_stats says
                torch._foreach_copy_(stats, saved_stats)
            self._sam_muted = False
            _restore_metric_states(saved_metrics)

    def _sam_due_schedulers(self, interval: str, plateau: bool) -> list[LRSchedulerConfig]:
        """The LR schedulers Lightning's automatic loop (``_update_learning_rates``) would step now."""
        trainer = self.trainer
        index = trainer.fit_loop.epoch_loop.batch_idx if interval == "step" else trainer.current_epoch
        return [
            c
            for c in self._sam_schedulers
            if c.reduce_on_plateau == plateau and c.interval == interval and (index + 1) % c.frequency == 0
        ]

    def _sam_step_plateau_due(self) -> None:
        """Step the per-step ReduceLROnPlateau schedulers due since the last update.

        Lightning steps them once the batch is over, after a validation run that may follow it; the
        next of these comes first: the end of that validation, the start of the next batch or the end
        of the epoch (both seen first by :class:`_PlateauClock`, before other callbacks).
        """
        due, self._sam_plateau_due = self._sam_plateau_due, []
        self._sam_step_configs(due)

    def _sam_step_configs(self, configs: list[LRSchedulerConfig]) -> None:
        trainer = self.trainer
        for config in configs:
            value = None
            if config.reduce_on_plateau:
                value = trainer.callback_metrics.get(config.monitor)  # type: ignore[arg-type]
                if value is None:
                    message = (
                        f"ReduceLROnPlateau conditioned on metric {config.monitor!r}, which is not available. "
                        f"Available metrics are: {sorted(trainer.callback_metrics)}."
                    )
                    if config.strict:
                        raise MisconfigurationException(
                            message + " Log it, or set 'strict': False in the scheduler dict."
                        )
                    warnings.warn(message + " Skipping the LR update (strict=False).", RuntimeWarning, stacklevel=2)
                    continue
            self.lr_scheduler_step(config.scheduler, value)


class _PlateauClock(pl.Callback):
    """Steps a SAMLightningModule's pending per-step ReduceLROnPlateau schedulers.

    The mixin puts it first among the Trainer's callbacks, so this happens before other callbacks
    (LearningRateMonitor) look at the learning rate of the next batch or the epoch's end.
    """

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if isinstance(pl_module, SAMLightningModule):
            pl_module._sam_step_plateau_due()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, SAMLightningModule):
            pl_module._sam_step_plateau_due()


class _ModuleLayout(NamedTuple):
    """What the step needs to know about the module, found once per fit (after SyncBatchNorm conversion)."""

    norms: list[_BatchNorm]  # frozen in the perturbed pass by switching track_running_stats off
    other_stats: list[Tensor]  # running statistics of other norm layers: put back after the perturbed pass
    metrics: list[torchmetrics.Metric]
    buffers: list[Tensor]  # saved at the start of each update, restored if it is skipped or fails
    step_takes_batch_idx: bool
    selected: frozenset[int] | None  # ids of the parameters to perturb (None: all)

    @classmethod
    def of(cls, module: SAMLightningModule) -> _ModuleLayout:
        selected = None
        if module.sam.only is not None:
            selected = frozenset(
                id(p)
                for prefix, m in module.named_modules()
                for name, p in m.named_parameters(prefix=prefix, recurse=False)
                if module.sam.selects(name, m)
            )
            if not selected:
                raise ValueError(f"`only={module.sam.only!r}` selects no parameter of {type(module).__name__}.")
        return cls(
            norms=[m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats],
            other_stats=[
                b
                for m in module.modules()
                if isinstance(m, _NormBase) and not isinstance(m, _BatchNorm) and m.track_running_stats
                for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None
            ],
            buffers=list(module.buffers()),
            metrics=[m for m in module.modules() if isinstance(m, torchmetrics.Metric)],
            step_takes_batch_idx=is_param_in_hook_signature(type(module).training_step, "batch_idx", min_args=2),
            selected=selected,
        )


class _BufferBackup:
    """A copy of a module's buffers (BatchNorm statistics), to undo a skipped or failed update."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._valid = False

    def save_(self, buffers: list[Tensor]) -> None:
        if len(buffers) != len(self._buffers) or any(a is not b for a, b in zip(buffers, self._buffers)):
            self._buffers = buffers
            self._saved = [torch.empty_like(b) for b in buffers]
        if buffers:
            torch._foreach_copy_(self._saved, buffers)
        self._valid = True

    def restore_(self) -> None:
        if self._valid and self._buffers:
            torch._foreach_copy_(self._buffers, self._saved)

    def discard(self) -> None:
        self._valid = False


class _Accumulated:
    """The descent gradients summed over the earlier micro-batches of an update, per parameter."""

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._sums: list[Tensor] = []

    def save_(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """Keep ``grads`` (which already hold the earlier sums, see :meth:`load_`) as the new sums."""
        if _same(params, self._params):
            torch._foreach_copy_(self._sums, grads)
        else:  # first micro-batch, or a parameter got its first gradient in this one
            self._params, self._sums = params, torch._foreach_clone(grads)

    def load_(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """``grads <- sums`` (zero for parameters without one), before a descent backward adds to them."""
        if _same(params, self._params):
            torch._foreach_copy_(grads, self._sums)
            return
        torch._foreach_zero_(grads)
        if not self._params:  # nothing accumulated yet
            return
        sums = {id(p): s for p, s in zip(self._params, self._sums)}
        pairs = [(g, sums[id(p)]) for p, g in zip(params, grads) if id(p) in sums]
        if pairs:
            torch._foreach_copy_([g for g, _ in pairs], [s for _, s in pairs])

    def discard(self) -> None:
        self._params, self._sums = [], []


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _loss_of(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise TypeError(
            "SAMLightningModule needs `training_step` to return the loss, as a tensor or a dict with a 'loss' key; "
            f"got {type(output).__name__}."
        )
    return loss


def _no_sync(strategy: Any) -> Any:
    """Skip the gradient all-reduce of the coming backward under DDP."""
    return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()


def _save_metric_states(metrics: list[torchmetrics.Metric]) -> list[tuple[torchmetrics.Metric, dict, int, Any]]:
    copies: dict[int, Any] = {}  # metrics in a MetricCollection's compute group share their states

    def copy(value: Any) -> Any:
        if id(value) not in copies:
            copies[id(value)] = value.clone() if isinstance(value, Tensor) else list(value)
        return copies[id(value)]

    return [(m, {k: copy(v) for k, v in m.metric_state.items()}, m._update_count, m._computed) for m in metrics]


def _restore_metric_states(saved: list[tuple[torchmetrics.Metric, dict, int, Any]]) -> None:
    for metric, state, update_count, computed in saved:
        for name, value in state.items():
            setattr(metric, name, value)
        metric._update_count = update_count
        metric._computed = computed
