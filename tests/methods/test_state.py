"""ParameterState: per-parameter tensors bound to the optimizer's parameters, checkpointed by position."""

import torch

from lightning_sam import FriendlySAM, LookSAM
from lightning_sam.methods.state import ParameterState


def test_a_second_load_replaces_pending_per_parameter_state():
    for method, key in ((LookSAM(k=2), "gv"), (FriendlySAM(), "m")):
        w = torch.nn.Parameter(torch.ones(3))
        saved = {"values": [torch.ones(3)], "index": [0]}
        state = {"gv": saved["values"], "index": [0]} if key == "gv" else {"m": saved}
        method.load_state_dict(state)
        method.load_state_dict({key: None})  # e.g. fit(ckpt_path=...) after load_from_checkpoint
        method.bind_([w])
        assert method.state_dict()[key] is None


def test_values_follow_the_bound_parameters_by_position():
    a, b, c = (torch.nn.Parameter(torch.full((n,), float(n))) for n in (1, 2, 3))
    state = ParameterState("test")
    state.bind_([a, b, c])
    state.set_([c, a], [torch.zeros(3), torch.ones(1)])  # kept in the bound order
    assert state.params == [a, c]
    saved = state.to_checkpoint()
    assert saved["index"] == [0, 2]
    state.bind_([b, c])  # a's group was removed from the optimizer: its value goes
    assert state.params == [c] and state.to_checkpoint()["index"] == [1]
    fresh = ParameterState("test")
    fresh.load_(saved)  # before bind: kept until the parameters are known
    assert not fresh
    fresh.bind_([a, b, c])
    assert fresh.params == [a, c] and torch.equal(fresh.lookup()[id(c)], torch.zeros(3))


def test_a_checkpoint_of_other_parameters_is_refused():
    state = ParameterState("LookSAM")
    state.bind_([torch.nn.Parameter(torch.ones(2))])
    for bad in ({"values": [torch.ones(3)], "index": [0]}, {"values": [torch.ones(2)], "index": [5]}):
        try:
            state.load_(bad)
        except ValueError as err:
            assert "The LookSAM state in the checkpoint does not match the model's parameters" in str(err)
        else:
            raise AssertionError("a mismatching state was loaded")
