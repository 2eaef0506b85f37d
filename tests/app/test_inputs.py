"""The app's command line as a user types it: every bad value one line, exit 2, no run directory; resumes
with other overrides refused or recorded; an unwritable checkpoint folder mid-run ends in one line.

The app runs in this process through its real entry point (``main()`` with ``sys.argv``), so Hydra
composes, makes the run directory and writes ``.hydra/`` exactly as for ``python -m lightning_sam.train``.
"""

import errno
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from lightning_sam.app import runs
from lightning_sam.app.train import main


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``python -m lightning_sam.train *args``, in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lightning_sam.train", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _base(data_dir: Path, run: Path, *extra: str) -> list[str]:
    return ["debug=default", f"data.data_dir={data_dir}", f"hydra.run.dir={run}", *extra]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("sam=foo", r"`sam=foo` is not an option of the config group `sam`; expected one of: aesam, asam, fsam"),
        ("logger=nonexistent", r"`logger=nonexistent` is not an option of the config group `logger`"),
        ("trainer.foo=3", r"`trainer.foo=3` sets a key the config does not have; to add it, write `\+trainer.foo=3`"),
        ("+trainer.max_epochs=3", r"`\+trainer.max_epochs=3` adds a key the config already has"),
        ("sam.rho=[1", r"Cannot read the override `sam.rho=\[1`"),
        ("sam.rho=0.1,0.2", r"`sam.rho=0.1,0.2` gives several values: add -m"),
        ("trainer.limit_train_batches=0", r"Expected `trainer.limit_train_batches` to be a positive number"),
        ("trainer.devices=0", r"Invalid `trainer.devices=0`: `Trainer\(devices=0\)` value is not a valid input"),
        ("trainer.precision=17", r"Invalid `trainer.precision=17`: Precision 17 is invalid"),
        ("scheduler=step scheduler.milestones=abc", r"Expected `scheduler.milestones` to be a list of epochs"),
        ("+trainer.check_val_every_n_epoch=0", r"Expected `trainer.check_val_every_n_epoch` to be null or an int >= 1"),
        ("+trainer.val_check_interval=100", r"`trainer.val_check_interval` to be at most the 4 training batches"),
        ("logger=null", r"`logger=null` cannot be composed .*a config group takes the name of an option"),
        ("sam=none sam.rho=0.1", r"`sam.rho=0.1` sets a key of `sam=none`, which has none"),
        ("optimizer.momentum=0 optimizer.nesterov=true", r"Invalid `optimizer.nesterov=true`: Nesterov momentum"),
        ("scheduler=step scheduler.gamma=abc", r"Expected `scheduler.gamma` to be a number, got 'abc'"),
        ("scheduler.eta_min=-1", r"Invalid `scheduler.eta_min=-1`: the learning rate would be -1 at epoch 1"),
        ("sam=gsam trainer.accumulate_grad_batches=2",
         r"`sam=gsam` cannot train with this Trainer: .*`trainer.accumulate_grad_batches=2`"),
        ("sam=gsam optimizer.lr=0", r"`optimizer.lr` \(through `sam.rho_schedule.lr_max`\) to be a float > lr_min"),
        ("callbacks.checkpoint.mode=foo", r"`callbacks.checkpoint.mode`"),
        ("sam=msam optimizer.momentum=0", r"`sam=msam` cannot train with this optimizer: .*`optimizer.momentum` 0"),
        ("data.seed=abc", r"Expected `data.seed` to be an int \(a torch.Generator seed\), got 'abc'"),
        ("data.seed=1.5", r"Expected `data.seed` to be an int \(a torch.Generator seed\), got 1.5"),
        ("+scheduler.lr=0.1", r"`scheduler.lr` is not an argument of torch.optim.lr_scheduler.CosineAnnealingLR"),
        ("sam=gsam +sam.rho_schedule.rho=1", r"`sam.rho_schedule.rho` is not an argument of lightning_sam.RhoSchedule"),
        ("+optimizer.foo=1", r"`optimizer.foo` is not an argument of torch.optim.SGD; it takes: lr, momentum"),
        ("+sam.foo=1", r"`sam.foo` is not an argument of lightning_sam.SAM; it takes: rho, interval"),
        ("+data.foo=1", r"`data.foo` is not an argument of .*MNIST1DDataModule; it takes: data_dir, batch_size"),
        ("callbacks.lr_monitor.logging_interval=foo", r"Invalid `callbacks.lr_monitor.logging_interval=foo`: "),
        ("+callbacks.checkpoint.every_n_epochs=abc", r"Invalid `callbacks.checkpoint.every_n_epochs=abc`: "),
        ("sam.rho_schedule={_target_:lightning_sam.RhoSchedule,shape:cosine}",
         r"Expected `sam.rho_schedule.total_steps` to be an int >= 1"),
        ("trainer.limit_train_batches=0.001", r"`trainer.limit_train_batches` to leave at least one of the 29 train"),
        ("trainer.limit_val_batches=0.01", r"`trainer.limit_val_batches` to leave at least one of the 4 val"),
        ("trainer.limit_test_batches=0.001", r"`trainer.limit_test_batches` to leave at least one of the 8 test"),
        ("trainer.log_every_n_steps=-1", r"Expected `trainer.log_every_n_steps` to be null or an int >= 0"),
        ("trainer.deterministic=abc", r"Expected `trainer.deterministic` to be true, false, warn or null, got 'abc'"),
        ("sam.rho=${oops}", r"`sam.rho=\$\{oops\}` cannot be resolved: Interpolation key 'oops' not found"),
        ("~trainer.max_epochs", r"`scheduler.T_max: \$\{trainer.max_epochs\}` \(from the config\) cannot be resolved"
                                r".*\(removed by `~trainer.max_epochs`\)"),
        ("callbacks.checkpoint.dirpath=/proc/ck", r"Cannot write /proc/ck \(`callbacks.checkpoint.dirpath`\)"),
        ("logger.csv.save_dir=/proc/lg", r"Cannot write /proc/lg \(`logger.csv.save_dir`\)"),
        ("sam=asam sam=bogus", r"^error: `sam=bogus` is not an option of the config group `sam`"),
        ("data.val_fraction=0.9999", r"`data.val_fraction` to leave at least one of the 4000 training samples"),
        ("data.data_dir=/proc/foo", r"Cannot find or write the data at `data.data_dir='/proc/foo'`"),
        ("+trainer.max_epoch=3", r"`trainer.max_epoch` is not an argument of lightning.pytorch.Trainer \(did you "
                                 r"mean `trainer.max_epochs`\?\); it takes: accelerator, strategy"),
        ("+trainer.fast_dev_run=-1", r"^error: Invalid `trainer.fast_dev_run=-1`: fast_dev_run=-1 is not a valid"),
        ("scheduler.T_max=0", r"Expected `scheduler.T_max` to be an int >= 1 \(epochs to decay over\), got 0.$"),
        ("sam.rho_schedule={_target_:lightning_sam.RhoSchedul,shape:cosine,total_steps:10}",
         r"Error loading 'lightning_sam.RhoSchedul': ModuleNotFoundError"),
        ("+callbacks.sharpness.every=3", r"`callbacks.sharpness.every` is not an argument of .*SharpnessMonitor; it "
                                         r"takes none"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_exit_2_and_leaves_no_run_directory(
    tmp_path, mnist1d_dir, monkeypatch, capsys, override, match
):
    run = tmp_path / "run"
    args = _base(mnist1d_dir, run, *override.split())
    if override.startswith("data.data_dir="):
        args.remove(f"data.data_dir={mnist1d_dir}")
    code, out, err = _run(monkeypatch, capsys, *args)
    assert code == 2, err[-3000:]
    assert re.search(match, _error_line(err)), err
    assert "Traceback" not in err and "test accuracy" not in out
    assert not run.exists()


def test_a_sweep_with_an_unknown_option_is_refused_before_any_job(tmp_path, mnist1d_dir, monkeypatch, capsys):
    code, _, err = _run(
        monkeypatch, capsys, "-m", "sam=sam,nope", "debug=default", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    assert code == 2
    assert "`sam=nope` is not an option of the config group `sam`" in _error_line(err)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("swept", ["sam.rho=0.05,-1", "sam.rho=-1,0.05", "trainer.max_epochs=1,0"])
def test_a_sweep_with_a_bad_value_is_refused_before_any_job(tmp_path, mnist1d_dir, monkeypatch, capsys, swept):
    sweep = tmp_path / "sweep"
    code, out, err = _run(
        monkeypatch, capsys, "-m", swept, "debug=default", f"data.data_dir={mnist1d_dir}", f"hydra.sweep.dir={sweep}"
    )
    assert code == 2, err[-3000:]
    key = swept.split("=")[0]
    assert re.search(rf"Expected `{re.escape(key)}` to be .*got (-1|0)\.", _error_line(err)), err
    assert "test accuracy" not in out and "Launching" not in out + err
    assert not sweep.exists()


@pytest.mark.parametrize("how", ["-m after the overrides", "hydra.mode=MULTIRUN"])
def test_a_sweep_asked_for_otherwise_than_by_a_leading_m_is_checked_and_runs(
    tmp_path, mnist1d_dir, monkeypatch, capsys, how
):
    def sweep(value: str, where: Path) -> tuple[int, str, str]:
        args = ["debug=default", f"data.data_dir={mnist1d_dir}", "test=false", "trainer.max_epochs=1", value,
                f"hydra.sweep.dir={where}"]  # fmt: skip
        return _run(monkeypatch, capsys, *([*args, "-m"] if how.startswith("-m") else [how, *args]))

    code, _, err = sweep("sam.rho=0.05,${oops}", tmp_path / "bad")
    assert code == 2 and "`sam.rho=${oops}` cannot be resolved" in _error_line(err)
    assert not (tmp_path / "bad").exists()
    code, _, err = sweep("sam.rho=0.05,0.1", tmp_path / "good")
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "good").iterdir() if p.is_dir()) == ["0", "1"]


def test_a_sweep_names_the_job_whose_composition_fails(tmp_path, mnist1d_dir, monkeypatch, capsys):
    code, _, err = _run(monkeypatch, capsys, "-m", "debug=default", "sam=sam,looksam", "sam.interval=2",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    assert code == 2 and _error_line(err).endswith("(in the job with sam=looksam).")
    assert not (tmp_path / "sweep").exists()


def test_a_folder_given_as_ckpt_path_is_named_so(tmp_path, mnist1d_dir, monkeypatch, capsys):
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, tmp_path / "run", f"ckpt_path={tmp_path}"))
    assert code == 2 and _error_line(err).endswith(f"got '{tmp_path}': a folder.")


def test_a_sweep_runs_as_its_jobs_would_alone(tmp_path, mnist1d_dir, monkeypatch, capsys):
    """The checks of a sweep's jobs before the first (they seed, build models and Trainers) change nothing it trains."""
    base = ["debug=default", f"data.data_dir={mnist1d_dir}", "test=false"]
    code, _, err = _run(monkeypatch, capsys, *base, "sam.rho=0.1", f"hydra.run.dir={tmp_path / 'alone'}")
    assert code == 0, err[-3000:]
    code, _, err = _run(monkeypatch, capsys, "-m", *base, "sam.rho=0.1,0.2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, err[-3000:]
    alone = torch.load(tmp_path / "alone" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    swept = torch.load(tmp_path / "sweep" / "0" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert alone.keys() == swept.keys() and len(alone) > 0
    for name in alone:
        assert torch.equal(alone[name], swept[name]), name


def test_a_sweep_whose_config_needs_hydras_run_still_runs(tmp_path, mnist1d_dir, monkeypatch, capsys):
    """``${hydra:job.num}`` exists only inside Hydra's run: the checks before the first job leave it to the jobs."""
    sweep = tmp_path / "sweep"
    args = ["-m", "debug=default", f"data.data_dir={mnist1d_dir}", "data.seed=${hydra:job.num}", "sam.rho=0.05,0.1"]
    code, _, err = _run(monkeypatch, capsys, *args, "test=false", f"hydra.sweep.dir={sweep}")
    assert code == 0, err[-3000:]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").exists() and (sweep / "1" / "checkpoints" / "last.ckpt").exists()


def test_the_checks_of_a_sweep_leave_torch_flags_as_they_were(tmp_path, mnist1d_dir, monkeypatch, capsys):
    assert not torch.are_deterministic_algorithms_enabled()
    args = ["-m", "debug=default", f"data.data_dir={mnist1d_dir}", "trainer.deterministic=true", "sam.rho=0.1,-1"]
    code, _, err = _run(monkeypatch, capsys, *args, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 2 and "sam.rho" in _error_line(err)  # the first job's Trainer was built, then the second refused
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_refused_run_removes_the_folders_it_made(tmp_path, mnist1d_dir, monkeypatch, capsys):
    run = tmp_path / "new" / "deeper" / "run"
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, run, "sam.rho=-1"))
    assert code == 2 and "sam.rho" in _error_line(err)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, even empty
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, tmp_path / "kept" / "run", "sam.rho=-1"))
    assert code == 2 and (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "run").exists()


@pytest.mark.parametrize("where", ["/sys/lightning_sam_run", "a_file/run"])
def test_an_unwritable_output_location_is_one_line(tmp_path, mnist1d_dir, monkeypatch, capsys, where):
    (tmp_path / "a_file").write_text("not a folder")
    run = where if where.startswith("/") else str(tmp_path / where)
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, Path(run)))
    assert code == 2
    line = _error_line(err)
    assert f"Cannot write the run directory {run} (`hydra.run.dir`)" in line
    assert ("is not writable" in line) if where.startswith("/") else ("is not a folder" in line)


def test_a_checkpoint_folder_that_becomes_unwritable_ends_in_one_line_and_the_resume_command(
    tmp_path, mnist1d_dir, monkeypatch, capsys
):
    run = tmp_path / "run"
    real_mkstemp, calls = tempfile.mkstemp, []

    def refusing_mkstemp(*args, **kwargs):  # AtomicCheckpointIO's temporary file, from the second epoch on
        folder = kwargs.get("dir")
        if folder is not None and Path(folder).name == "checkpoints":
            calls.append(folder)
            if len(calls) > 2:  # epoch 0 wrote its best and last checkpoints
                raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(runs.tempfile, "mkstemp", refusing_mkstemp)
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, run, "trainer.max_epochs=3", "scheduler=none"))
    assert code == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-2] == f"error: cannot write {run / 'checkpoints'} (Permission denied). Make it writable. Resume with:"
    assert lines[-1].strip().startswith("python -m lightning_sam.train debug=default")
    assert lines[-1].endswith(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------- resuming


def test_a_resume_that_changes_what_cannot_change_is_refused_naming_each_key(
    tmp_path, mnist1d_dir, monkeypatch, capsys
):
    run = tmp_path / "run"
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, run, "trainer.max_epochs=2", "test=false"))
    assert code == 0, err[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    config = (run / ".hydra" / "config.yaml").read_text()
    resume = [*_base(mnist1d_dir, tmp_path / "other", f"ckpt_path={ckpt}", "test=false")]
    # the cosine schedule's length follows trainer.max_epochs: 2 epochs planned, 3 asked
    code, _, err = _run(monkeypatch, capsys, *resume, "trainer.max_epochs=3", "optimizer.lr=0.5")
    assert code == 2
    line = _error_line(err)
    assert "`optimizer.lr`: 0.1 in the run, 0.5 now" in line
    assert "`scheduler.T_max`: 2 in the run, 3 now (it follows `trainer.max_epochs`)" in line
    assert "keys that may change on resume: trainer.max_epochs" in line
    assert (run / ".hydra" / "config.yaml").read_text() == config  # the run's own config untouched
    assert not (run / "resumes.yaml").exists()


def test_a_resume_that_changes_what_may_change_continues_and_is_recorded(tmp_path, mnist1d_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    short = ["scheduler=none", "test=false"]
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, run, "trainer.max_epochs=1", *short))
    assert code == 0, err[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    longer = ["trainer.max_epochs=2", *short, f"ckpt_path={ckpt}"]
    code, out, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, tmp_path / "other", *longer))
    assert code == 0, err[-3000:]
    assert "8 optimizer steps" in out  # 4 more after the checkpoint's 4
    history = yaml.safe_load((run / "resumes.yaml").read_text())
    assert history == [
        {"global_step": 4, "ckpt_path": str(ckpt), "changed": {"trainer.max_epochs": {"was": 1, "now": 2}}}
    ]
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    # resumed again with the same overrides: nothing differs from the run's (updated) config
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, tmp_path / "again", *longer))
    assert code == 0, err[-3000:]
    assert len(yaml.safe_load((run / "resumes.yaml").read_text())) == 1


def test_a_resume_of_a_run_made_before_a_config_key_existed_is_not_refused(tmp_path, mnist1d_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    short = ["scheduler=none", "test=false"]
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, run, "trainer.max_epochs=1", *short))
    assert code == 0, err[-3000:]
    for config in (run / ".hydra" / "config.yaml", run / ".run" / "config.yaml"):  # as 0.2.0 wrote it
        saved = yaml.safe_load(config.read_text())
        del saved["trainer"]["limit_test_batches"]
        config.write_text(yaml.safe_dump(saved))
    ckpt = run / "checkpoints" / "last.ckpt"
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, tmp_path / "b", "trainer.max_epochs=2", *short,
                                                    f"ckpt_path={ckpt}"))  # fmt: skip
    assert code == 0, err[-3000:]
    assert "limit_test_batches" not in (run / "resumes.yaml").read_text()  # not a change this resume made
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, tmp_path / "c", "trainer.max_epochs=2", *short,
                                                    "trainer.limit_test_batches=1", f"ckpt_path={ckpt}"))  # fmt: skip
    assert code == 0, err[-3000:]  # typed now: recorded as a change (it may change on resume)
    assert "trainer.limit_test_batches" in (run / "resumes.yaml").read_text()


def test_a_resume_that_lengthens_a_run_a_method_plans_by_is_refused(tmp_path, mnist1d_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    late = ["sam=late_phase", "sam.start=0.5", "scheduler=none", "test=false"]
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, run, "trainer.max_epochs=2", *late))
    assert code == 0, err[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    code, _, err = _run(monkeypatch, capsys, *_base(mnist1d_dir, tmp_path / "b", "trainer.max_epochs=4", *late,
                                                    f"ckpt_path={ckpt}"))  # fmt: skip
    assert code == 2
    expected = "`trainer.max_epochs`: 2 in the run, 4 now (LatePhaseSAM(rho=0.05, start=0.5) plans by the run's length)"
    assert expected in _error_line(err)


def test_a_sweep_set_by_the_config_or_run_elsewhere_is_not_refused(monkeypatch):
    from lightning_sam.app.command_line import check_command_line

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    # hparams_search sets hydra.mode=MULTIRUN itself: a comma list is a sweep, one composition per value
    assert len(check_command_line(["debug=default", "hparams_search=rho", "optimizer.momentum=0.8,0.9"])) == 2
    # a SLURM job resolves its values where it runs: ${oc.env:SLURM_JOB_ID} does not exist on the login node
    check_command_line(["-m", "launcher=slurm", "trainer.default_root_dir=/scratch/${oc.env:SLURM_JOB_ID}"])
