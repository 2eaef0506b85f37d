"""SAMLightningModule: a LightningModule mixin that runs the two-pass SAM step inside Lightning's own loop.

The mixin only orchestrates; the math is in :mod:`lightning_sam.methods` and what an update saves and
checks in :mod:`lightning_sam.core`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import nullcontext
from dataclasses import dataclass, fields, is_dataclass
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning, GradientAccumulationScheduler
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from typing_extensions import override

from lightning_sam._compat import grad_sync, should_update_logs
from lightning_sam._context import StepContext
from lightning_sam.core.update import SKIPPED_STEPS_KEY, SAMStepStats, SAMUpdate
from lightning_sam.methods import SAM, Method, method_from_config, method_to_config, shipped

__all__ = ["SAMLightningModule", "SAMStepStats"]

# Lightning looks these hooks up on the instance. The mixin shadows them there with wrappers that run
# the SAM logic around the user's own definition, wherever that sits in the MRO: this works with the
# mixin first (`class M(SAMLightningModule, Existing)`), as the only base, and with a subclass that
# overrides `optimizer_step` or `backward` itself.
_WRAPPED_HOOKS = (
    "training_step",
    "backward",
    "optimizer_step",
    "on_fit_start",
    "on_save_checkpoint",
    "on_load_checkpoint",
)
_CHECKPOINT_KEY = "lightning_sam"


class SAMLightningModule(pl.LightningModule):
    """Trains a LightningModule with Sharpness-Aware Minimization, inside Lightning's automatic optimization.

    Put it first among the bases of an existing LightningModule (or use it as the only base). Nothing
    else changes: ``training_step`` returns the loss, ``configure_optimizers`` returns your optimizer
    and scheduler, and the Trainer's own ``gradient_clip_val``, ``accumulate_grad_batches``,
    precision, strategy, callbacks and checkpoints work as without SAM. Each optimizer step runs:

    1. the clean pass at ``w`` and its backward (under DDP without gradient all-reduce, so each
       replica computes its own ``e``, as in the paper);
    2. ``e(w)`` from that gradient (``sam``); ``w <- w + e``;
    3. the perturbed pass at ``w + e`` and its backward, with the clean pass's random draws (dropout
       masks), buffers (BatchNorm statistics) updated by the clean pass only, nothing logged and no
       torchmetrics updated (what ``training_step`` logs counts once);
    4. ``w`` restored bit for bit from a saved copy;
    5. then Lightning as always: ``on_before_optimizer_step``, clipping (unscaled under AMP), the
       optimizer step with the perturbed gradient, LR schedulers, ``global_step``.

    With ``Trainer(accumulate_grad_batches=N)`` every micro-batch gets its own ``e`` and the perturbed
    gradients add up (one all-reduce per optimizer step under DDP). The clean pass is the one Lightning
    runs; the perturbed pass calls ``training_step`` a second time with the same batch.

    A step with a non-finite loss or gradient in either pass is skipped: weights, buffers and
    optimizer state stay as they were, ``global_step`` advances, and ``sam/skipped_steps`` counts it
    (an fp16 overflow under a GradScaler is the scaler's own skip, as in plain Lightning).
    An exception inside the step (the optimizer's included, if raised before it writes) leaves weights
    and buffers as they were before it, then propagates.

    Args:
        sam: the perturbation rule, a method object (default ``SAM(rho=0.05)``), or the same as plain
            data: ``{"class_path": "lightning_sam.ASAM", "init_args": {"rho": 0.5}}``.
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
        >>> trainer = pl.Trainer(max_epochs=1, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
        >>> trainer.global_step
        4
    """

    def __init__(
        self, *args: Any, sam: Method | Mapping[str, Any] | None = None, sync_perturbation: bool = False, **kwargs: Any
    ) -> None:
        given = sam is not None
        if sam is None:
            sam = SAM()
        elif isinstance(sam, Mapping):
            sam = method_from_config(sam)
        if not isinstance(sam, Method):
            raise TypeError(
                f"Expected `sam` to be a method object (one of {shipped()}, or a lightning_sam.Method of your "
                f"own), its config {{'class_path': ..., 'init_args': ...}}, or None for SAM(rho=0.05); got {sam!r}."
            )
        if not isinstance(sync_perturbation, bool):
            raise TypeError(f"Expected `sync_perturbation` to be True or False, got {sync_perturbation!r}.")
        super().__init__(*args, **kwargs)
        self.sam = sam
        self.sync_perturbation = sync_perturbation
        self._sam_given = given  # passed by the caller (or hyperparameters), not the default
        self._sam_update = SAMUpdate(sam)
        self._sam_pass = _PassState()  # written several times a step: a plain object, not nn.Module.__setattr__
        for name in _WRAPPED_HOOKS:
            object.__setattr__(self, name, getattr(self, f"_sam_{name}"))

    # ------------------------------------------------------------------ public state
    @property
    def sam_last_step(self) -> SAMStepStats | None:
        """The figures of the last SAM step (``None`` before the first)."""
        return self._sam_update.last

    @property
    def sam_skipped_steps(self) -> int:
        """How many updates were skipped for a non-finite loss or gradient (not a GradScaler's overflows)."""
        return self._sam_update.skipped_steps

    @sam_skipped_steps.setter
    def sam_skipped_steps(self, value: int) -> None:
        self._sam_update.skipped_steps = value

    @override
    def save_hyperparameters(self, *args: Any, frame: Any = None, **kwargs: Any) -> None:
        """Lightning's ``save_hyperparameters``, with the method recorded as plain data.

        So ``hparams.yaml`` loads with ``yaml.safe_load`` and a checkpoint with ``torch.load(weights_only=True)``
        in a process that never imported lightning_sam; ``load_from_checkpoint`` rebuilds the same method.
        """
        import inspect

        if frame is None:
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        super().save_hyperparameters(*args, frame=frame, **kwargs)
        for hparams in (self._hparams, getattr(self, "_hparams_initial", None)):
            if hparams is not None and isinstance(hparams.get("sam"), Method):
                hparams["sam"] = method_to_config(hparams["sam"])

    # ------------------------------------------------------------------ checks before training
    @property  # type: ignore[override]
    @override
    def trainer(self) -> pl.Trainer:
        return pl.LightningModule.trainer.fget(self)  # type: ignore[attr-defined]

    @trainer.setter
    def trainer(self, trainer: pl.Trainer | None) -> None:
        # Attached before Lightning validates its loop configuration, so our errors come first.
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._sam_check_trainer(trainer)
            # a new fit: bind again, at `on_fit_start` or, if a callback trains before it (the Tuner's
            # finders run their trial steps from their own `on_fit_start`), at the first training step
            self._sam_update.unbind_()
            if not any(isinstance(c, _UndoOnException) for c in trainer.callbacks):
                trainer.callbacks.insert(0, _UndoOnException())  # first: before any other's on_exception
        pl.LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]

    def _sam_check_trainer(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if not self.automatic_optimization:
            raise ValueError(
                "SAMLightningModule runs SAM inside Lightning's automatic optimization, but "
                f"`{type(self).__name__}.automatic_optimization` is False. Keep automatic optimization, or drop the "
                "mixin and call `lightning_sam.sam_step(self, optimizer, closure, method)` in your own training_step."
            )
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                "SAMLightningModule cannot run under FSDPStrategy (FSDP v1): its flattened shards hide the global "
                "gradient norm that e needs. Use FSDP2: `Trainer(strategy=ModelParallelStrategy())` with "
                "`torch.distributed.fsdp.fully_shard` applied in `configure_model`."
            )
        if isinstance(strategy, DeepSpeedStrategy) or strategy.handles_gradient_accumulation:
            raise ValueError(
                f"SAMLightningModule cannot run under {type(strategy).__name__}: it runs the optimizer step and "
                "gradient accumulation inside its own engine, where the two SAM passes cannot be placed. Use DDP "
                "(`strategy='ddp'`) or FSDP2 (`ModelParallelStrategy`)."
            )
        if isinstance(strategy, ModelParallelStrategy) and not self.sync_perturbation:
            rank_zero_warn(
                "Under ModelParallelStrategy (FSDP2) every backward reduce-scatters the gradients, so SAM's e "
                "comes from the gradient averaged over replicas, as with `sync_perturbation=True`."
            )
        if getattr(strategy, "_ddp_kwargs", {}).get("static_graph") and not self.sync_perturbation:
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
        if is_param_in_hook_signature(type(self).training_step, "dataloader_iter", explicit=True):
            raise TypeError(
                f"`{type(self).__name__}.training_step(dataloader_iter)` is not supported by SAMLightningModule: the "
                "perturbed pass needs the same batch again. Take `batch, batch_idx` instead."
            )
        self._sam_check_accumulation(trainer)

    def _sam_check_accumulation(self, trainer: pl.Trainer) -> None:
        if self.sam.uses_clean_gradient:
            schedules = [c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)]
            most = max([trainer.accumulate_grad_batches, *(max(c.scheduling.values()) for c in schedules)])
            if most > 1:
                raise ValueError(
                    f"{type(self.sam).__name__} combines the clean and perturbed gradients of one batch; it does not "
                    f"support `accumulate_grad_batches={most}`. Use a larger batch, or SAM/ASAM."
                )

    @override
    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Refused: the mixin runs both backward passes itself, inside automatic optimization."""
        raise RuntimeError(
            f"`{type(self).__name__}.training_step` called `self.manual_backward(...)`, but SAMLightningModule runs "
            "both backward passes itself, inside Lightning's automatic optimization. Remove the call (and any "
            "`optimizer.step()`/`zero_grad()` there) and return the loss from `training_step`. For a module that "
            "steps its own optimizers (several optimizers, a GAN), drop the mixin and use "
            "`lightning_sam.sam_step(self, optimizer, closure, method)`."
        )

    @override
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``, silent during the perturbed pass (so each step logs once)."""
        if not self._sam_pass.perturbing:
            super().log(name, value, *args, **kwargs)

    # ------------------------------------------------------------------ wrapped hooks
    def _sam_on_fit_start(self) -> None:
        type(self).on_fit_start(self)
        self._sam_bind(self.trainer)  # again after a finder: it restored the module as it was

    def _sam_bind(self, trainer: pl.Trainer) -> None:
        self._sam_check_accumulation(trainer)  # again: `configure_callbacks` may have added a schedule
        self._sam_pass.takes_batch_idx = is_param_in_hook_signature(type(self).training_step, "batch_idx", min_args=2)
        self._sam_update.method = self.sam
        unfrozen_later = any(isinstance(c, BaseFinetuning) for c in trainer.callbacks)
        self._sam_update.bind_(self, trainer.optimizers[0], unfrozen_later=unfrozen_later)
        self._sam_pass.planned = not self.sam.follows_run_length

    def _sam_plan(self, trainer: pl.Trainer) -> None:
        """A method that plans by the run's length learns it at the first step, once the data is loaded.

        Asking the Trainer at ``on_fit_start`` loads the training data early, before a resumed loader's
        position is restored: a mid-epoch resume would start the epoch over.
        """
        if not self._sam_pass.planned:
            total = trainer.estimated_stepping_batches
            self._sam_update.method.plan_(None if math.isinf(total) else int(total))
            self._sam_pass.planned = True

    def _sam_on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        type(self).on_save_checkpoint(self, checkpoint)
        # Lightning's SLURM requeue handler saves from inside a signal handler, maybe mid-step: never w + e
        saved = self._sam_update.unperturbed()
        if saved and "state_dict" in checkpoint:
            for name, param in self.named_parameters():
                if id(param) in saved and name in checkpoint["state_dict"]:
                    checkpoint["state_dict"][name] = saved[id(param)].detach().clone()
        checkpoint[_CHECKPOINT_KEY] = {
            "config": method_to_config(self.sam),
            "method": self.sam.state_dict(),
            "skipped_steps": self.sam_skipped_steps,
        }

    def _sam_on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        type(self).on_load_checkpoint(self, checkpoint)
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is None:
            return
        config = state.get("config")
        if config is not None and method_from_config(config) != self.sam:
            saved = method_from_config(config)
            if self._trainer is None and not self._sam_given:  # load_from_checkpoint(path): the checkpoint's own
                self.sam = self._sam_update.method = saved
            else:
                rank_zero_warn(
                    f"The checkpoint was trained with {saved!r}; this module trains with {self.sam!r} from here on."
                )
        self.sam.load_state_dict(state["method"])
        self.sam_skipped_steps = state["skipped_steps"]

    def _sam_training_step(self, *args: Any, **kwargs: Any) -> Any:
        user_step = type(self).training_step
        update, trainer = self._sam_update, self._trainer
        if trainer is None or not trainer.training:
            return user_step(self, *args, **kwargs)
        if not update.bound:  # a step before on_fit_start: a finder's trial, which must measure the SAM step
            self._sam_bind(trainer)
        self._sam_plan(trainer)
        if not self._sam_pass.takes_batch_idx:
            args = args[:1]  # Lightning passed batch_idx because this wrapper takes *args
        if self._sam_pass.perturbing:
            return user_step(self, *args, **kwargs)
        optimizer = trainer.optimizers[0]
        with update.guarded():  # nothing is lost: weights and buffers go back to where this update started
            # the first micro-batch of an update reads the optimizer's parameters and saves the buffers
            update.open_(trainer.global_step, optimizer)
            single_pass = update.is_sam_step and self.sam.single_pass
            two_pass = update.is_sam_step and not single_pass
            if single_pass:  # Momentum-SAM, RWP: w <- w + e before the forward, the only pass
                update.perturb_(optimizer, lr=optimizer.param_groups[0]["lr"])
            elif two_pass:  # the perturbed pass draws the same random numbers, from the same buffers
                update.begin_clean_()
            # the perturbed pass gets the batch as the clean pass found it, whatever that pass pops from it
            batch = (_containers_copied(args), kwargs) if two_pass else (args, kwargs)
            output = user_step(self, *args, **kwargs)
        self._sam_pass.batch = batch
        clean_loss = _loss_or_none(output)
        self._sam_pass.clean_loss = clean_loss.detach() if clean_loss is not None else None  # no graph kept
        if single_pass and clean_loss is None:  # a skipped batch: no backward will put w back
            update.restore_()
        return output

    def _sam_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        def user_backward(tensor: Tensor) -> None:
            type(self).backward(self, tensor, *args, **kwargs)

        update = self._sam_update
        if self._sam_pass.perturbing or not update.is_open:
            return user_backward(loss)
        with update.guarded():
            if update.is_sam_step and self.sam.single_pass:  # the gradient at w + e; then w back
                user_backward(loss)
                update.unperturb_(self._sam_pass.clean_loss if self._sam_pass.clean_loss is not None else loss)
            elif update.is_sam_step:
                self._sam_passes(loss, user_backward)
            else:
                update.note_loss(loss)
                user_backward(loss)

    def _sam_optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        user_step = type(self).optimizer_step
        update, trainer = self._sam_update, self._trainer
        if optimizer_closure is None or trainer is None or not trainer.training:
            return user_step(self, epoch, batch_idx, optimizer, optimizer_closure)
        if not update.bound:  # a finder's first trial step: Lightning calls this hook before training_step
            self._sam_bind(trainer)
        self._sam_plan(trainer)
        context = StepContext.of(trainer, self.sam, self.sync_perturbation)
        # the clean pass stays local to this replica (each its own e) unless it is averaged; a single-pass
        # method's only pass is the descent's
        local_clean = (
            not self.sam.single_pass
            and update.takes_sam_step(trainer.global_step, trainer.optimizers[0])
            and not context.syncs_clean
        )

        def sam_closure() -> Any:
            self._sam_pass.last_micro_batch = True
            try:
                with grad_sync(trainer.strategy.model, enabled=False) if local_clean else nullcontext():
                    result = optimizer_closure()
            finally:
                self._sam_pass.last_micro_batch = False
            # the step's one host sync; under DDP every replica skips if any must, so weights stay equal
            context.close_(update, trainer.optimizers[0])
            return result

        with update.guarded():
            user_step(self, epoch, batch_idx, optimizer, sam_closure)
        update.end_()
        if should_update_logs(trainer):
            self.log(SKIPPED_STEPS_KEY, float(update.skipped_steps), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ the two passes
    def _sam_passes(self, loss: Tensor, user_backward: Callable[[Tensor], None]) -> None:
        """Steps 1-4 inside Lightning's backward of the clean loss: e(w), the perturbed pass, w restored."""
        trainer, update = self.trainer, self._sam_update
        context = StepContext.of(trainer, self.sam, self.sync_perturbation)
        strategy, optimizer = trainer.strategy, trainer.optimizers[0]
        last = self._sam_pass.last_micro_batch

        def clean_backward() -> None:
            user_backward(loss)
            if context.syncs_clean and not last:  # Lightning runs earlier micro-batches under its own no_sync
                context.average_(self.parameters())

        args, kwargs = self._sam_pass.batch
        n = trainer.accumulate_grad_batches

        def perturbed_pass() -> Tensor:
            self._sam_pass.perturbing = True
            try:
                # the last micro-batch's perturbed backward all-reduces the summed descent gradient
                with grad_sync(strategy.model, enabled=True) if last else nullcontext():
                    perturbed_loss = _loss_of(strategy.training_step(*args, **kwargs))
                    scaled = perturbed_loss / n if n > 1 else perturbed_loss
                    user_backward(context.scaler.scale(scaled) if context.scaler is not None else scaled)
            finally:
                self._sam_pass.perturbing = False
            return perturbed_loss

        clean_loss = self._sam_pass.clean_loss if self._sam_pass.clean_loss is not None else loss
        # an adaptive method chose a plain step: a clean pass kept local must now be averaged (at the last micro-batch)
        plain_step_params = list(self.parameters()) if last else None
        context.passes_(update, optimizer, clean_loss, clean_backward, perturbed_pass, plain_step_params)


class _UndoOnException(pl.Callback):
    """Puts weights and buffers back when fit stops on an exception in the middle of a SAM update.

    The mixin's own hooks guard the step, but Lightning runs the micro-batches of an accumulation
    window before the last outside ``optimizer_step``: a callback's ``on_before_backward`` raising there
    would leave a single-pass method's ``w + e`` in the module. The mixin puts this callback first in
    ``trainer.callbacks`` when a fit starts (the others keep their order), so its ``on_exception``
    runs before any other's (``OnExceptionCheckpoint`` then saves ``w``).
    """

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, SAMLightningModule) and pl_module._sam_update.is_open:
            pl_module._sam_update.abort_()


@dataclass(slots=True)
class _PassState:
    """Where the SAM step of the current micro-batch stands."""

    perturbing: bool = False  # inside the perturbed pass: logging off, the user's step runs plain
    last_micro_batch: bool = False  # inside the closure Lightning hands to optimizer_step
    batch: tuple[tuple, dict] = ((), {})  # what the clean pass's training_step received
    clean_loss: Tensor | None = None
    takes_batch_idx: bool = True
    planned: bool = True  # the method knows the run's length (or does not need it)


def _containers_copied(value: Any) -> Any:
    """``value`` with its containers copied, all the way down; tensors and other leaves shared.

    Dicts (and other mutable mappings such as a tokenizer's ``BatchEncoding``), lists, tuples,
    dataclass instances and ``SimpleNamespace`` objects are copied, so a ``training_step`` that pops
    from its batch (``labels = batch.pop("labels")``) or reassigns a field (``batch.x = batch.x / 2``)
    finds the same batch again in the perturbed pass. A tensor changed in place is changed in both.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, MutableMapping):
        copied = copy.copy(value)  # the same class
        for key in list(copied.keys()):
            copied[key] = _containers_copied(copied[key])
        return copied
    if isinstance(value, list):
        copied = copy.copy(value)
        copied[:] = [_containers_copied(v) for v in value]
        return copied
    if isinstance(value, tuple):
        items = [_containers_copied(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if (is_dataclass(value) and not isinstance(value, type)) or isinstance(value, SimpleNamespace):
        copied = copy.copy(value)
        names = [f.name for f in fields(copied)] if is_dataclass(copied) else list(vars(copied))
        for name in names:
            object.__setattr__(copied, name, _containers_copied(getattr(copied, name)))
        return copied
    return value


def _loss_or_none(output: Any) -> Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    return loss if isinstance(loss, Tensor) else None


def _loss_of(output: Any) -> Tensor:
    loss = _loss_or_none(output)
    if loss is None:
        raise TypeError(
            "SAMLightningModule needs `training_step` to return the loss, as a tensor or a dict with a 'loss' key, "
            f"in both passes of a step; the perturbed pass got {type(output).__name__}."
        )
    return loss
