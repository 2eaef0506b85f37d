import pytest

from lightning_sam.data import MNIST1DDataModule


@pytest.fixture(scope="session")
def mnist1d_dir(tmp_path_factory):
    """MNIST-1D generated once for the whole test session."""
    root = tmp_path_factory.mktemp("mnist1d")
    MNIST1DDataModule(root).prepare_data()
    return root
