import pytest
import torch

from lightning_sam.data import MNIST1DDataModule


@pytest.fixture(scope="session")
def mnist1d_dir(tmp_path_factory):
    """MNIST-1D generated once for the whole test session."""
    root = tmp_path_factory.mktemp("mnist1d")
    MNIST1DDataModule(root).prepare_data()
    return root


@pytest.fixture
def quadratic():
    """(A, w0): a positive definite 4x4 A and a start, in float64 (closed-form SAM steps on 1/2 w^T A w)."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    m = torch.randn(4, 4)
    yield m @ m.T + torch.eye(4), torch.randn(4)
    torch.set_default_dtype(torch.float32)
