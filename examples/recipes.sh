#!/usr/bin/env bash
# Recipes for the training app. Each line is a complete command; run them from anywhere once the
# package is installed (pip install -e . in the repository). Results go to outputs/<task>/<time>_<pid>/.
set -euo pipefail

# The default: MNIST-1D (generated locally), the 1-D CNN, SAM with rho 0.05, SGD, cosine, 30 epochs.
python -m lightning_sam.train

# A quick end-to-end check of any configuration: one epoch of four batches on CPU.
python -m lightning_sam.train debug=default

# Sweep rho (one run each, in multirun/train/<time>/<n>/).
python -m lightning_sam.train -m sam.rho=0.02,0.05,0.1,0.2

# Switch the method and the optimizer; compare with the same setup without SAM.
python -m lightning_sam.train sam=asam sam.rho=1.0
python -m lightning_sam.train sam=sam optimizer=adamw optimizer.lr=3e-3
python -m lightning_sam.train sam=none

# Label noise: 40% of the training labels replaced by wrong ones, SAM against plain SGD.
python -m lightning_sam.train -m experiment=mnist1d_label_noise sam=none,asam,msam   # each at its own tuned setting

# Gradient accumulation and clipping: the Trainer's own, with SAM as without (each micro-batch its own e).
python -m lightning_sam.train trainer.accumulate_grad_batches=4 trainer.gradient_clip_val=1.0

# The paper's CIFAR-10 setup (WideResNet-28-10, 200 epochs, rho 0.05) and its SGD baseline, on a GPU.
python -m lightning_sam.train experiment=cifar10_wrn28_10_sam data.download=true
python -m lightning_sam.train experiment=cifar10_wrn28_10_sgd
python -m lightning_sam.train experiment=cifar100_wrn28_10_sam data.download=true

# Multi-GPU data parallel (one process per GPU; data.batch_size is per GPU).
python -m lightning_sam.train experiment=cifar10_wrn28_10_sam trainer=ddp trainer.devices=4

# DDP on CPU with two gloo processes, to try it without GPUs.
python -m lightning_sam.train trainer=ddp_cpu trainer.devices=2

# Tune rho and the learning rate with Optuna on the best validation accuracy (pip install -e ".[tune]"),
# and give the SGD baseline the same budget.
python -m lightning_sam.train hparams_search=rho experiment=mnist1d_label_noise
python -m lightning_sam.train hparams_search=lr experiment=mnist1d_label_noise

# The newer methods.
python -m lightning_sam.train sam=late_phase sam.start=0.8
python -m lightning_sam.train sam=aesam sam.c=0.0
python -m lightning_sam.train sam=fsam sam.sigma=1.0

# Try a SLURM launch locally through submitit (pip install -e ".[slurm]"), then on SLURM.
python -m lightning_sam.train -m launcher=local debug=default
# python -m lightning_sam.train -m launcher=slurm experiment=cifar10_wrn28_10_sam trainer=ddp trainer.devices=4
