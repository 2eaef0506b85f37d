"""Every import path of 0.2.0 keeps working after the layout change; `import lightning_sam` imports no Hydra."""

import subprocess
import sys


def test_the_import_paths_of_0_2_keep_working():
    from lightning_sam import (  # noqa: F401
        AESAM,
        ASAM,
        GSAM,
        SAM,
        FriendlySAM,
        LatePhaseSAM,
        LookSAM,
        ParamGroup,
        RhoSchedule,
        SAMLightningModule,
        SAMStepStats,
        SharpnessMonitor,
        WeightBackup,
        global_norm,
        sam_step,
    )
    from lightning_sam.backup import BufferBackup, GradientStash, MetricStates  # noqa: F401
    from lightning_sam.callbacks import HessianMonitor  # noqa: F401
    from lightning_sam.methods import SAM as MethodsSAM
    from lightning_sam.methods import method_from_config, method_to_config  # noqa: F401
    from lightning_sam.runs import AtomicCheckpointIO, RunCSVLogger, RunLock  # noqa: F401
    from lightning_sam.step import SKIPPED_STEPS_KEY, ModuleLayout, SAMUpdate  # noqa: F401
    from lightning_sam.tensors import any_non_finite, global_dot  # noqa: F401
    from lightning_sam.train import ConfigError, load_run, main, train  # noqa: F401

    assert MethodsSAM is SAM
    assert SAMUpdate.__module__ == "lightning_sam.core.update"


def test_import_lightning_sam_imports_no_hydra_and_load_run_no_hydra_app():
    code = (
        "import sys, lightning_sam; print('hydra' in sys.modules)\n"
        "import lightning_sam.landscape; print('lightning_sam.app.train' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_a_method_subclass_written_the_way_of_0_2_keeps_its_settings():
    """Public attributes set in an `__init__` were a method's settings in 0.2: compared, configured, pickled."""
    import copy
    import pickle

    from lightning_sam import SAM
    from lightning_sam.methods import method_from_config, method_to_config

    a, b = Mine(0.1, beta=0.9), Mine(0.1, beta=0.1)
    assert a != b and a == Mine(0.1, beta=0.9) and hash(a) == hash(Mine(0.1, beta=0.9))
    assert method_to_config(a)["init_args"]["beta"] == 0.9
    assert method_from_config(method_to_config(a)) == a
    assert pickle.loads(pickle.dumps(a)).beta == copy.deepcopy(a).beta == 0.9
    assert isinstance(a, SAM) and a.state is not None


def test_the_shipped_classes_pickle_under_the_module_path_of_0_2():
    import pickle

    from lightning_sam import AESAM, RhoSchedule

    assert b"lightning_sam.methods\x94\x8c\x05AESAM" in pickle.dumps(AESAM())
    assert RhoSchedule.__module__ == "lightning_sam.methods"


class Mine(__import__("lightning_sam").SAM):
    """A subclass as 0.2 allowed: its own __init__ sets a public attribute."""

    def __init__(self, rho: float = 0.05, beta: float = 0.5, **options):
        super().__init__(rho, **options)
        self.beta = beta
