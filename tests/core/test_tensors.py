import pytest
import torch

from lightning_sam.core.tensors import add_scaled_, any_non_finite, copy_into, global_dot, global_norm, norm_of_norms


def test_global_norm():
    assert global_norm([torch.tensor([3.0]), torch.tensor([[4.0]])]).item() == pytest.approx(5.0)


def test_global_norm_reduces_low_precision_in_float32_and_keeps_float64():
    big = torch.full((4,), 60000.0, dtype=torch.float16)  # its square overflows fp16
    assert global_norm([big]).item() == pytest.approx(120000.0)
    assert global_norm([torch.ones(2, dtype=torch.float64)]).dtype == torch.float64
    assert global_norm([]).item() == 0.0


def test_global_dot_and_norm_of_norms():
    a, b = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.tensor([4.0, 5.0]), torch.tensor([6.0])]
    assert global_dot(a, b).item() == pytest.approx(32.0)
    assert norm_of_norms([torch.tensor(3.0), torch.tensor(4.0)]).item() == pytest.approx(5.0)


@pytest.mark.parametrize("keep", [False, True])
def test_add_scaled_and_copy_into(keep):
    targets, sources = [torch.zeros(2)], [torch.ones(2)]
    add_scaled_(targets, sources, torch.tensor(0.5), keep_sources=keep)
    assert torch.equal(targets[0], torch.full((2,), 0.5))
    buffer = copy_into(None, sources)
    assert torch.equal(buffer[0], sources[0]) and buffer[0] is not sources[0]
    assert copy_into(buffer, [torch.full((2,), 3.0)])[0] is buffer[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_any_non_finite_finds_one_bad_element_and_changes_nothing(dtype, bad):
    tensors = [torch.randn(3, 4, dtype=dtype), torch.randn(5, dtype=torch.float32).t(), torch.tensor([-0.0, 1.0])]
    before = [t.clone() for t in tensors]
    assert not any_non_finite(tensors)
    assert all(torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()) for a, b in zip(tensors, before))
    tensors[0][2, 1] = bad
    assert any_non_finite(tensors).item() is True


def test_any_non_finite_edge_cases():
    assert not any_non_finite([])
    assert not any_non_finite([torch.full((2,), torch.finfo(torch.float32).max), torch.full((2,), 65504.0).half()])
    sparse = torch.tensor([0.0, 2.0]).to_sparse()
    assert not any_non_finite([sparse, torch.ones(2)])
    assert any_non_finite([torch.tensor([0.0, float("nan")]).to_sparse(), torch.ones(2)])
    assert any_non_finite([torch.ones(2, dtype=torch.float64), torch.tensor([float("inf")]).to_sparse()])
