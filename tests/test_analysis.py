import copy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam.analysis import (
    batch_loss,
    filter_normalized_direction,
    interpolate,
    max_loss_increase,
    plot_slices,
    random_plane,
    top_hessian_eigenvalue,
)
from tests.helpers import make_data, make_net

ROOT = Path(__file__).resolve().parents[1]


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_hessian_eigenvalue_of_least_squares_is_exact():
    torch.manual_seed(0)
    x = torch.randn(64, 8) @ torch.diag(torch.linspace(0.2, 3.0, 8))
    y = torch.randn(64, 1)
    model = nn.Linear(8, 1, bias=False)
    exact = torch.linalg.eigvalsh(2 * x.T @ x / 64).max().item()  # H of mean((Xw - y)^2)
    estimate = top_hessian_eigenvalue(model, lambda: F.mse_loss(model(x), y), iters=200, tol=1e-6)
    assert estimate == pytest.approx(exact, rel=0.01)


def test_hessian_eigenvalue_of_a_small_network_matches_the_full_hessian():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    params = list(net.parameters())
    shapes = [p.shape for p in params]

    def flat_loss(flat):
        chunks, i = [], 0
        for s in shapes:
            n = s.numel()
            chunks.append(flat[i : i + n].view(s))
            i += n
        w1, b1, w2, b2 = chunks
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    hessian = torch.autograd.functional.hessian(flat_loss, torch.cat([p.detach().flatten() for p in params]))
    eigenvalues = torch.linalg.eigvalsh(hessian)
    exact = eigenvalues[eigenvalues.abs().argmax()].item()
    estimate = top_hessian_eigenvalue(net, lambda: F.cross_entropy(net(x), y), iters=500, tol=1e-7)
    assert estimate == pytest.approx(exact, rel=0.01)


class WithUnusedHead(nn.Module):
    """A body the loss goes through and a trainable head it never reaches (as in multi-task models)."""

    def __init__(self, body: nn.Module, head: bool = True):
        super().__init__()
        self.body = body
        self.head = nn.Linear(4, 5) if head else None  # registered after the body: same start vector there

    def forward(self, x):
        return self.body(x)


def _unused_head_pair():
    torch.manual_seed(1)
    body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    with_head = WithUnusedHead(copy.deepcopy(body)).double()
    without = WithUnusedHead(copy.deepcopy(body), head=False)
    return with_head, without, x, y


def test_hessian_eigenvalue_ignores_an_unused_head():
    with_head, without, x, y = _unused_head_pair()
    values = {}
    for name, net in (("with", with_head), ("without", without)):
        before = _weights(net)
        # tol=0: both run all products, so they agree to rounding, not to the tolerance
        values[name] = top_hessian_eigenvalue(net, lambda net=net: F.cross_entropy(net(x), y), iters=300, tol=0.0)
        assert all(torch.equal(a, b) for a, b in zip(before, _weights(net)))
        assert all(p.grad is None for p in net.parameters())
    assert values["with"] == pytest.approx(values["without"], rel=1e-6)
    # and it is the top eigenvalue of the body's Hessian, not an artefact such as 0
    params = list(without.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def flat_loss(w):
        chunks = torch.split(w, [p.numel() for p in params])
        w1, b1, w2, b2 = (c.view(p.shape) for c, p in zip(chunks, params))
        return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_loss, flat))
    assert values["without"] == pytest.approx(eigenvalues[eigenvalues.abs().argmax()].item(), rel=1e-3)


def test_max_loss_increase_ignores_an_unused_head():
    with_head, without, x, y = _unused_head_pair()
    head = _weights(with_head.head)
    found = [max_loss_increase(net, lambda net=net: F.cross_entropy(net(x), y), rho=0.1, steps=3)
             for net in (with_head, without)]  # fmt: skip
    assert found[0] == pytest.approx(found[1], rel=1e-9)
    assert found[1][0] > 0
    assert all(torch.equal(a, b) for a, b in zip(head, _weights(with_head.head)))


class UnusedHeadClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.aux_head = nn.Linear(8, 2)  # trainable, never used by the loss

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_probes_leave_weights_mode_and_global_rng_alone():
    net = make_net()
    x, y = make_data(n=32).tensors
    loss = batch_loss(net, [(x, y)])
    for mode in ("train", "eval"):
        getattr(net, mode)()
        before, state = _weights(net), torch.random.get_rng_state()
        buffers = [b.clone() for b in net.buffers()]
        net.eval()  # no BN statistics updates during the probes
        top_hessian_eigenvalue(net, loss, iters=5)
        max_loss_increase(net, loss, rho=0.1, steps=3)
        random_plane(net, loss, points=3)
        getattr(net, mode)()
        assert all(torch.equal(a, b) for a, b in zip(before, _weights(net)))
        assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
        assert torch.equal(state, torch.random.get_rng_state())
        assert net.training == (mode == "train")


def test_max_loss_increase_one_step_is_sams_and_more_steps_find_more():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        m = torch.randn(5, 5)
        a = m @ m.T
        net = nn.Linear(5, 1, bias=False)

        def loss():
            w = net.weight[0]
            return 0.5 * w @ a @ w + torch.sin(w).sum()  # not quadratic, so more steps can help

        w = net.weight.detach()[0].clone()
        g = a @ w + torch.cos(w)
        e = 0.3 * g / g.norm()
        sam = 0.5 * (w + e) @ a @ (w + e) + torch.sin(w + e).sum() - (0.5 * w @ a @ w + torch.sin(w).sum())
        one, base = max_loss_increase(net, loss, rho=0.3, steps=1)
        assert one == pytest.approx(sam.item(), rel=1e-9)
        assert base == pytest.approx(loss().item())
        assert max_loss_increase(net, loss, rho=0.3, steps=10)[0] >= one - 1e-12
    finally:
        torch.set_default_dtype(torch.float32)


def test_interpolation_endpoints_reproduce_both_models():
    a, b = make_net(seed=0), make_net(seed=1)
    x, y = make_data(n=32).tensors
    a.eval()
    b.eval()
    with torch.no_grad():
        loss_a, loss_b = F.cross_entropy(a(x), y).item(), F.cross_entropy(b(x), y).item()
    before = _weights(a)
    line = interpolate(a, a.state_dict(), b.state_dict(), batch_loss(a, [(x, y)]), alphas=[0.0, 0.5, 1.0])
    assert [alpha for alpha, _ in line] == [0.0, 0.5, 1.0]
    assert line[0][1] == pytest.approx(loss_a, rel=1e-6) and line[2][1] == pytest.approx(loss_b, rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(before, _weights(a)))


def test_random_plane_grid_and_filter_normalization(tmp_path):
    net = make_net()
    net.eval()
    x, y = make_data(n=32).tensors
    xs, ys, losses = random_plane(net, batch_loss(net, [(x, y)]), span=0.5, points=5)
    assert losses.shape == (5, 5) and torch.equal(xs, torch.linspace(-0.5, 0.5, 5))
    with torch.no_grad():
        assert losses[2, 2].item() == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-6)
    directions = filter_normalized_direction(net, torch.Generator().manual_seed(0))
    assert [d.shape for d in directions] == [p.shape for p in net.parameters()]  # the loop below sees all 6
    for p, d in zip(net.parameters(), directions):
        if p.dim() > 1:  # each row as long as the weights' row
            torch.testing.assert_close(d.norm(dim=1), p.detach().norm(dim=1), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(d, torch.zeros_like(p))
    png = plot_slices(tmp_path / "slices.png", {"line": [(0.0, 1.0), (1.0, 0.5)]}, {"plane": (xs, ys, losses)})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plotting_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "lightning-sam\[plots\]"'):
        plot_slices(tmp_path / "slices.png", {"line": [(0.0, 1.0), (1.0, 0.5)]})
    assert not (tmp_path / "slices.png").exists()


# As if matplotlib were not installed: not importable, and not among the installed distributions
# (Lightning and torchmetrics ask importlib.metadata whether it is there before importing it).
NO_MATPLOTLIB = """
import importlib.abc, importlib.metadata, sys


class NoMatplotlib(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoMatplotlib())
from_name = importlib.metadata.Distribution.from_name.__func__


def without_matplotlib(cls, name):
    if name.lower() == "matplotlib":
        raise importlib.metadata.PackageNotFoundError(name)
    return from_name(cls, name)


importlib.metadata.Distribution.from_name = classmethod(without_matplotlib)
"""


def test_the_package_imports_without_matplotlib():
    code = NO_MATPLOTLIB + (
        "import lightning_sam, lightning_sam.analysis, lightning_sam.callbacks, lightning_sam.landscape\n"
        "assert 'matplotlib' not in sys.modules\n"
        "try:\n"
        "    lightning_sam.analysis.plot_slices('never.png', {'line': [(0.0, 1.0)]})\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'pip install "lightning-sam[plots]"' in result.stdout


def test_landscape_command_from_two_runs(tmp_path, mnist1d_dir, monkeypatch):
    from lightning_sam.app.train import main

    for name, sam in (("sgd", "none"), ("sam", "sam")):  # the app's entry point, in this process (as in tests/app)
        argv = ["debug=default", f"sam={sam}", f"data.data_dir={mnist1d_dir}", f"hydra.run.dir={tmp_path / name}"]
        monkeypatch.setattr(sys, "argv", ["lightning_sam.train", *argv])
        main()
        assert (tmp_path / name / "checkpoints" / "last.ckpt").is_file()
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sam.landscape", str(tmp_path / "sgd"), str(tmp_path / "sam"),
         "--out", str(tmp_path / "land.png"), "--points", "5", "--batches", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "land.png").read_bytes()[:4] == b"\x89PNG"
    assert "interpolation:" in result.stdout


def test_generalization_report_quick_mode(tmp_path, monkeypatch, mnist1d_dir):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _app
    import generalization

    monkeypatch.setattr(generalization, "run_app", lambda *o: _app.run_app(*o, data_dir=mnist1d_dir))
    report = generalization.main(["--quick", "--out", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")])
    assert "| SGD, 2x epochs |" in report and "top Hessian eig." in report
    assert "nan" not in report
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--batches", "0"], "--batches must be an int >= 1"),
        (["--points", "1"], "--points must be an int >= 2"),
        (["--span", "nan"], "--span must be a positive number"),
        (["--out", "pic.xyz"], "--out must name a .png file"),
        (["--out", "/proc/x.png"], "/proc is not writable"),
    ],
)
def test_landscape_refuses_bad_arguments_before_loading_anything(tmp_path, capsys, extra, match):
    from lightning_sam import landscape

    with pytest.raises(SystemExit) as exit_:
        landscape.main([str(tmp_path), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        landscape.main([str(tmp_path / "nope")])
    assert "is not a run directory" in capsys.readouterr().err
