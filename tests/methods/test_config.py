"""A method's settings: checked when made, compared and hashed by value, printed as before, pickled without state,
and written as plain data (``class_path``/``init_args``) for checkpoints and hparams.yaml."""

import pickle

import pytest
import torch

from lightning_sam import AESAM, ASAM, GSAM, SAM, FriendlySAM, LatePhaseSAM, LookSAM, RhoSchedule
from lightning_sam.methods import method_from_config, method_to_config


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: SAM(rho=-0.1), ValueError, r"`rho` to be a finite, non-negative float, got -0.1"),
        (lambda: SAM(rho=float("nan")), ValueError, r"`rho` to be a finite, non-negative float, got nan"),
        (lambda: SAM(rho=float("inf")), ValueError, r"`rho`.*got inf"),
        (lambda: SAM(rho="0.05"), TypeError, r"`rho` to be a non-negative float, got '0.05' of type str"),
        (lambda: SAM(rho=True), TypeError, r"`rho` to be a non-negative float, got True"),
        (lambda: SAM(rho=None), TypeError, r"`rho` to be a non-negative float, got None"),
        (lambda: SAM(interval=0), ValueError, r"`interval` to be an int >= 1, got 0"),
        (lambda: SAM(only=3), TypeError, r"`only` to be 'normalization', a regular expression or None"),
        (lambda: SAM(only="("), ValueError, r"`only` to be 'normalization' or a valid regular expression"),
        (lambda: SAM(rho_schedule="cosine"), TypeError, r"`rho_schedule` to be a RhoSchedule or None"),
        (lambda: ASAM(rho=-1.0), ValueError, r"`rho`"),
        (lambda: ASAM(rho=0.5, eta=-0.01), ValueError, r"`eta` to be a finite, non-negative float, got -0.01"),
        (lambda: ASAM(rho=0.5, eta=[0.1]), TypeError, r"`eta` to be a non-negative float"),
        (lambda: GSAM(alpha=-0.1), ValueError, r"`alpha` to be a finite, non-negative float, got -0.1"),
        (lambda: LookSAM(k=0), ValueError, r"`k` to be an int >= 1, got 0"),
        (lambda: LookSAM(k=2.5), TypeError, r"`k` to be an int >= 1, got 2.5"),
        (lambda: LookSAM(interval=2), ValueError, r"LookSAM takes a SAM step every `k` steps"),
        (lambda: LatePhaseSAM(start=-1), ValueError, r"`start` to be an int step >= 0 or a float fraction in \[0, 1\]"),
        (lambda: LatePhaseSAM(start=1.5), ValueError, r"`start` to be an int step >= 0 or a float fraction"),
        (lambda: LatePhaseSAM(start="half"), TypeError, r"`start` to be an int step >= 0"),
        (lambda: AESAM(c=float("nan")), TypeError, r"`c` to be a float"),
        (lambda: AESAM(beta=1.0), ValueError, r"`beta` to be a float in \[0, 1\)"),
        (lambda: AESAM(interval=2), ValueError, r"AESAM decides every step itself"),
        (lambda: FriendlySAM(sigma=-1), ValueError, r"`sigma` to be a finite, non-negative float"),
        (lambda: FriendlySAM(lam=1.0), ValueError, r"`lam` to be a float in \[0, 1\)"),
    ],
)
def test_invalid_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_methods_compare_and_print_by_value():
    assert SAM(0.05) == SAM(0.05) != ASAM(0.05)
    assert ASAM(0.5, 0.01) == ASAM(0.5, 0.01) != ASAM(0.5, 0.0)
    assert len({SAM(0.1), SAM(0.1)}) == 1
    assert repr(ASAM(1, 0)) == "ASAM(rho=1.0, eta=0.0)"  # positional calls as before
    assert SAM(2).rho == 2.0 and isinstance(SAM(2).rho, float)
    assert LookSAM(k=3) != LookSAM(k=4) and hash(LookSAM(k=3)) == hash(LookSAM(k=3))
    # every repr as in 0.2.0
    assert [repr(m) for m in (SAM(0.1, interval=10, only="normalization"), LookSAM(0.05, 5, 0.7),
                              LatePhaseSAM(0.05, 0.75), AESAM(0.05, -float("inf")), FriendlySAM(), GSAM())] == [
        "SAM(rho=0.1, interval=10, only='normalization')", "LookSAM(rho=0.05, k=5, alpha=0.7)",
        "LatePhaseSAM(rho=0.05, start=0.75)", "AESAM(rho=0.05, c=-inf, beta=0.9)",
        "FriendlySAM(rho=0.05, sigma=1.0, lam=0.9)", "GSAM(rho=0.05, alpha=0.1)",
    ]  # fmt: skip


def test_settings_are_immutable():
    method = SAM(0.05)
    with pytest.raises(AttributeError):
        method.rho = 0.1


def test_methods_are_picklable_and_compare_by_their_settings_not_their_state():
    method = GSAM(0.05, alpha=0.2, rho_schedule=RhoSchedule("lr", lr_max=0.1))
    method.clean_gradient_([torch.ones(3)], [torch.ones(3)])  # state, not a setting
    clone = pickle.loads(pickle.dumps(method))
    assert clone == method == GSAM(0.05, alpha=0.2, rho_schedule=RhoSchedule("lr", lr_max=0.1))
    assert method.state.clean is not None and clone.state.clean is None  # a pickle carries no state


@pytest.mark.parametrize(
    "method",
    [SAM(0.05, interval=3, rho_schedule=RhoSchedule("cosine", total_steps=10)), ASAM(0.5, 0.0), GSAM(alpha=0.3),
     LookSAM(k=2), LatePhaseSAM(start=5), AESAM(c=-float("inf")), FriendlySAM(sigma=0.5)],
)  # fmt: skip
def test_the_config_round_trip(method):
    config = method_to_config(method)
    assert config["class_path"] == f"lightning_sam.{type(method).__name__}"
    assert method_from_config(config) == method


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"class_path": "lightning_sam.Nope"}, ValueError, r"to name a Method class, got 'lightning_sam.Nope'"),
        ({"class_path": "torch.nn.Linear"}, ValueError, r"`class_path` to name a Method class"),
        ({"init_args": {}}, TypeError, r"Expected a method config"),
    ],
)  # fmt: skip
def test_a_bad_config_is_named(config, error, match):
    with pytest.raises(error, match=match):
        method_from_config(config)
