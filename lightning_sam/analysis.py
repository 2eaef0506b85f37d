"""Sharpness probes and loss-landscape slices, in pure torch (plots need ``lightning-sam[plots]``).

* :func:`top_hessian_eigenvalue`: the largest Hessian eigenvalue by power iteration on
  Hessian-vector products.
* :func:`max_loss_increase`: the paper's sharpness measure, the largest loss increase within a
  rho-ball found by a few projected ascent steps (per batch: m-sharpness with m the batch size).
* :func:`interpolate` and :func:`random_plane`: 1-D slices between two weight vectors and 2-D
  slices along filter-normalized random directions (Li et al., NeurIPS 2018); :func:`plot_slices`.

Every function leaves the weights bit for bit as it found them and does not change the module's
train/eval mode; the loss closures decide which mode they evaluate in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "batch_loss",
    "filter_normalized_direction",
    "interpolate",
    "max_loss_increase",
    "plot_slices",
    "random_plane",
    "top_hessian_eigenvalue",
]

LossFn = Callable[[], Tensor]


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _zeros_for_none(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """``torch.autograd.grad(..., allow_unused=True)``'s gradients with zeros for the parameters it did not reach."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def top_hessian_eigenvalue(
    model: nn.Module, loss_fn: LossFn, iters: int = 100, tol: float = 1e-4, seed: int = 0
) -> float:
    """The eigenvalue of largest magnitude of the Hessian of ``loss_fn`` in the model's parameters.

    Power iteration ``v <- H v / ||H v||`` with Hessian-vector products (double backward), until the
    Rayleigh quotient changes by less than ``tol`` (relative) or after ``iters`` products.

    Args:
        model: its parameters that require grad span the Hessian (one the loss does not reach, such
            as an unused head, adds zero rows and columns: the same value as without it).
        loss_fn: no arguments; returns the loss at the model's current weights (a fixed batch, the
            mode the caller chose: ``model.eval()`` or ``train()`` is left as it is).
        iters: at most this many Hessian-vector products.
        tol: relative change of the estimate that stops the iteration.
        seed: seeds the random start vector (the global RNG is not touched).

    Example::

        >>> import torch
        >>> w = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
        >>> round(top_hessian_eigenvalue(w, lambda: (w(x) ** 2).sum()), 3)  # H = 2 X^T X = diag(2, 18)
        18.0
    """
    params = _params(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
    # H has zero rows for a parameter the loss does not reach (g_i is None) and for one whose g_i does
    # not depend on the weights (no graph): (H v)_j = sum_i v_i dg_i/dw_j runs over the other rows.
    rows = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not rows:
        return 0.0
    outputs = [grads[i] for i in rows]
    estimate = 0.0
    for _ in range(iters):
        hv = torch.autograd.grad(
            outputs, params, grad_outputs=[v[i] for i in rows], retain_graph=True, allow_unused=True
        )
        hv = _zeros_for_none(hv, params)  # the zero rows of H
        new = float(_dot(hv, v))  # the Rayleigh quotient v^T H v
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            return 0.0
        v = [x.detach() / norm for x in hv]
        if estimate and abs(new - estimate) <= tol * abs(estimate):
            return new
        estimate = new
    return estimate


def _snapshot(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def _load_(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, values):
            p.copy_(value)


def max_loss_increase(model: nn.Module, loss_fn: LossFn, rho: float = 0.05, steps: int = 5) -> tuple[float, float]:
    """The largest increase of the loss within ``||e|| <= rho``, by projected normalized ascent.

    Starts at ``e = 0`` and takes ``steps`` steps ``e <- P(e + (rho / steps) g / ||g||)`` with ``P``
    the projection onto the ball; the first step is SAM's (for ``steps = 1`` exactly SAM's ``e``).
    Returns ``(max L(w + e) - L(w), L(w))`` over the visited points. Weights are restored exactly.

    Example::

        >>> w = torch.nn.Linear(1, 1, bias=False)
        >>> torch.nn.init.constant_(w.weight, 1.0)
        Parameter containing:
        tensor([[1.]], requires_grad=True)
        >>> increase, loss = max_loss_increase(w, lambda: w(torch.ones(1)).pow(2).sum(), rho=0.5)
        >>> round(increase, 4), loss  # (1 + 0.5)^2 - 1
        (1.25, 1.0)
    """
    params = _params(model)
    start = _snapshot(params)
    try:
        with torch.no_grad():
            base = float(loss_fn())
        best = base
        e = [torch.zeros_like(p) for p in params]
        for _ in range(steps):
            # a parameter the loss does not reach has g = 0, so e = 0 there
            grads = _zeros_for_none(torch.autograd.grad(loss_fn(), params, allow_unused=True), params)
            g_norm = torch.sqrt(_dot(grads, grads)) + 1e-12
            e = [x + (rho / steps) * g / g_norm for x, g in zip(e, grads)]
            e_norm = float(torch.sqrt(_dot(e, e)))
            if e_norm > rho:
                e = [x * (rho / e_norm) for x in e]
            _load_(params, [w + x for w, x in zip(start, e)])
            with torch.no_grad():
                best = max(best, float(loss_fn()))
        return best - base, base
    finally:
        _load_(params, start)


def interpolate(
    model: nn.Module,
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    loss_fn: LossFn,
    alphas: Iterable[float] = tuple(i / 20 for i in range(-5, 26)),
) -> list[tuple[float, float]]:
    """Losses along ``(1 - a) * start + a * end``, for state dicts of ``model``.

    Floating-point entries (weights and BatchNorm statistics) are interpolated, others (counters)
    taken from ``start``, so both ends reproduce their models exactly. Returns ``[(a, loss)]``;
    the model's own state is restored afterwards.
    """
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = {k: v.detach().clone() for k, v in start.items()}  # state_dict() values alias the weights
    end = {k: v.detach().clone() for k, v in end.items()}
    state = model.state_dict()  # live references to the module's tensors
    mixed = [k for k, v in start.items() if v.is_floating_point()]
    try:
        model.load_state_dict(start)
        out = []
        for a in alphas:
            _load_([state[k] for k in mixed], [(1 - a) * start[k] + a * end[k] for k in mixed])
            with torch.no_grad():
                out.append((float(a), float(loss_fn())))
        return out
    finally:
        model.load_state_dict(original)


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[Tensor]:
    """A random direction scaled filter by filter to the weights' norms (Li et al. 2018).

    Each filter (a row of a weight matrix, an output channel of a convolution) of a Gaussian
    direction is rescaled to the norm of the same filter of the weights. Biases and other 1-D
    parameters (normalization layers) get no component, as in the paper.
    """
    directions = []
    for p in _params(model):
        if p.dim() <= 1:
            directions.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        dims = tuple(range(1, p.dim()))
        d *= p.detach().norm(dim=dims, keepdim=True) / (d.norm(dim=dims, keepdim=True) + 1e-10)
        directions.append(d)
    return directions


def random_plane(
    model: nn.Module, loss_fn: LossFn, span: float = 1.0, points: int = 21, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Losses on the plane ``w + x d1 + y d2`` with filter-normalized random directions ``d1, d2``.

    Returns ``(xs, ys, losses)`` with ``losses[i, j]`` at ``(xs[j], ys[i])``, coordinates in
    ``[-span, span]``. Weights are restored exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    params = _params(model)
    start = _snapshot(params)
    d1 = filter_normalized_direction(model, generator)
    d2 = filter_normalized_direction(model, generator)
    coords = torch.linspace(-span, span, points)
    losses = torch.empty(points, points)
    try:
        for i, y in enumerate(coords.tolist()):
            for j, x in enumerate(coords.tolist()):
                _load_(params, [w + x * a + y * b for w, a, b in zip(start, d1, d2)])
                with torch.no_grad():
                    losses[i, j] = float(loss_fn())
    finally:
        _load_(params, start)
    return coords, coords.clone(), losses


def plot_slices(
    path: str | Path,
    lines: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    planes: Mapping[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    title: str = "",
) -> Path:
    """Save 1-D slices (one line each) and 2-D slices (contour plots) side by side as a PNG.

    Needs matplotlib (``pip install "lightning-sam[plots]"``), imported here only. The figure is drawn
    without pyplot, so matplotlib's backend and pyplot's current figure stay as the caller had them.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('plot_slices needs matplotlib: `pip install "lightning-sam[plots]"`.') from err
    lines, planes = dict(lines or {}), dict(planes or {})
    panels = (1 if lines else 0) + len(planes)
    fig = Figure(figsize=(5 * max(panels, 1), 4))
    axes = fig.subplots(1, max(panels, 1), squeeze=False)
    axes_iter = iter(axes[0])
    if lines:
        ax = next(axes_iter)
        for label, values in lines.items():
            ax.plot([a for a, _ in values], [loss for _, loss in values], label=label)
        ax.set_xlabel("interpolation coefficient")
        ax.set_ylabel("loss")
        ax.legend()
    for label, (xs, ys, losses) in planes.items():
        ax = next(axes_iter)
        levels = torch.quantile(losses.flatten(), torch.linspace(0, 1, 16)).unique().tolist()
        contour = ax.contour(xs.numpy(), ys.numpy(), losses.numpy(), levels=levels if len(levels) > 1 else 10)
        ax.clabel(contour, fontsize=7)
        ax.set_title(label)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def batch_loss(model: nn.Module, batches: Sequence[Any], loss: Callable[..., Tensor] | None = None) -> LossFn:
    """A closure with the mean loss of ``model`` over fixed ``(x, y)`` batches (cross-entropy by default)."""
    loss = loss or nn.functional.cross_entropy

    def closure() -> Tensor:
        return sum(loss(model(x), y) for x, y in batches) / len(batches)  # type: ignore[return-value]

    return closure
