"""SENet's optimisation (the released SENet code; docs/method.md, "The SENet volumetric protocol"),
scaled to any number of steps.

- Two SGD optimisers, one per arm, both lr 1e-3, momentum 0.99, weight decay 1e-4: here ONE
  torch.optim.SGD with one parameter group per arm ('segmenter', 'conditioner'). SGD updates every
  parameter on its own, so this is the same update as two optimisers (tests/test_senet.py checks it),
  and the training loop keeps its one optimiser / one scheduler / one checkpoint format.
- StepLR(step 10 epochs), gamma 0.1 for the segmenter and 0.001 for the conditioner, stepped at the
  START of each of the 20 epochs: in epoch e (1-based) the rate is lr * gamma**floor(e / 10), i.e.
  epochs 1-9 lr, 10-19 lr*gamma, 20 lr*gamma**2. Scaled to n_steps: step t (0-based) is in epoch
  floor(t * epochs / n_steps) + 1.
- Not reproduced: from epoch 16 the official solver steps only one arm, and only when the previous
  epoch's validation loss rose; here both arms keep stepping at their (by then tiny) rates.
"""
from __future__ import annotations

import functools

import torch

from util.errors import UserError

ARMS = ("segmenter", "conditioner")


def build_senet_optimizer(model, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with the parameter groups 'segmenter' and 'conditioner' (in that order)."""
    arms = model.arm_parameters()
    groups = [{"params": [p for p in arms[arm] if p.requires_grad], "name": arm} for arm in ARMS]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def epoch_of_step(step: int, n_steps: int, epochs: int) -> int:
    """1-based epoch of 0-based step `step` when `n_steps` steps make `epochs` epochs."""
    return min(epochs, step * epochs // n_steps + 1)


def lr_factor(step: int, n_steps: int, epochs: int, step_epochs: int, gamma: float) -> float:
    """Multiplier of the base rate at 0-based step `step` (StepLR stepped at each epoch's start)."""
    return gamma ** (epoch_of_step(step, n_steps, epochs) // step_epochs)


def build_senet_scheduler(optimizer: torch.optim.Optimizer, n_steps: int, epochs: int = 20,
                          step_epochs: int = 10, gamma_segmenter: float = 0.1,
                          gamma_conditioner: float = 0.001) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler (call .step() after every optimiser step) for `build_senet_optimizer`'s groups."""
    if n_steps < 1 or epochs < 1 or step_epochs < 1:
        raise UserError(f"senet schedule: n_steps {n_steps}, epochs {epochs}, lr_step_epochs {step_epochs}: "
                        "all must be >= 1")
    gammas = {"segmenter": gamma_segmenter, "conditioner": gamma_conditioner}
    lambdas = [functools.partial(lr_factor, n_steps=n_steps, epochs=epochs, step_epochs=step_epochs,
                                 gamma=gammas[group.get("name", "segmenter")])
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
