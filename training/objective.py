"""What the training loop builds and minimises, per method (docs/method.md).

prototype (LSLPN, PANet): SGD + MultiStepLR(lr_milestones, lr_gamma); cross-entropy on the query logits
(head 'alpnet': SSL-ALPNet's) + boundary_weight x boundary loss + model.align_weight x alignment loss.
senet: SENet's released optimisation, one SGD with a parameter group per arm (the same update as its two
optimisers) and its 20-epoch StepLR stepped at each epoch's start, scaled to n_steps; Dice loss. Not
reproduced: from epoch 16 the official solver steps one arm only when the validation loss rose.
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from models.alpnet_head import query_loss as alpnet_query_loss
from models.boundary_loss import boundary_loss
from models.fewshot import SENET, method_of
from models.fewshot import build_model as _build
from models.local_prototypes import IGNORE
from models.senet import senet_loss
from util.options import BOOL, Option, integer, number

# SENet's released schedule and fidelity switches (config.py's `senet` section takes these defaults)
SENET_DEFAULTS = {"official_bug": False, "double_softmax": False, "epochs": 20, "lr_step_epochs": 10,
                  "gamma_segmenter": 0.1, "gamma_conditioner": 0.001}
SENET_OPTIONS = {"official_bug": Option(BOOL), "double_softmax": Option(BOOL),
                 "epochs": integer(1, example="20"), "lr_step_epochs": integer(1, example="10"),
                 "gamma_segmenter": number(0, 1, low_open=True, example="0.1"),
                 "gamma_conditioner": number(0, 1, low_open=True, example="0.001")}


def build_model(cfg: Mapping) -> torch.nn.Module:
    """The run's model (models/fewshot.py) on the CPU; SENet takes senet.official_bug."""
    return _build({**cfg["model"], "official_bug": cfg["senet"]["official_bug"]}, cfg["path"]["init_path"])


def build_optimisation(cfg: Mapping, model: torch.nn.Module):
    """(optimizer, scheduler) of the run's method; the scheduler is stepped after every step."""
    if method_of(cfg["model"]) == SENET:
        senet = cfg["senet"]
        optimizer = build_senet_optimizer(model, cfg["lr"], cfg["momentum"], cfg["weight_decay"])
        return optimizer, build_senet_scheduler(optimizer, cfg["n_steps"], senet["epochs"],
                                                senet["lr_step_epochs"], senet["gamma_segmenter"],
                                                senet["gamma_conditioner"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                                momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg["lr_milestones"]),
                                                     gamma=cfg["lr_gamma"])
    return optimizer, scheduler


def episode_loss(cfg: Mapping, logits: Tensor, labels: Tensor, aux_loss: Tensor) -> Tensor:
    """The training loss of one batch: logits B x Q x C x H x W, labels B x Q x H x W (int)."""
    if method_of(cfg["model"]) == SENET:
        return senet_loss(logits, labels, bool(cfg["senet"]["double_softmax"]))
    if cfg["model"].get("head") == "alpnet":   # SSL-ALPNet's query loss: background weight 0.05
        loss = alpnet_query_loss(logits, labels)
    else:  # ignore_index as the official code (our query labels are 0..N: no pixel is ignored)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(0, 1), ignore_index=IGNORE)
    boundary_weight = float(cfg.get("boundary_weight", 0.0))
    if boundary_weight:      # 0 (the default): not computed, the loss is bit-equal to the loss without it
        loss = loss + boundary_weight * boundary_loss(logits, labels)
    if cfg["model"].get("align", False):
        loss = loss + float(cfg["model"].get("align_weight", 1.0)) * aux_loss.float()
    return loss


# ------------------------------------------------------------------------------- SENet's schedule
def build_senet_optimizer(model, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with the parameter groups 'segmenter' and 'conditioner' (in that order)."""
    groups = [{"params": [p for p in getattr(model, arm).parameters() if p.requires_grad], "name": arm}
              for arm in ("segmenter", "conditioner")]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def epoch_of_step(step: int, n_steps: int, epochs: int) -> int:
    """1-based epoch of 0-based step `step` when `n_steps` steps make `epochs` epochs."""
    return min(epochs, step * epochs // n_steps + 1)


def lr_factor(step: int, n_steps: int, epochs: int, step_epochs: int, gamma: float) -> float:
    """Multiplier of the base rate at 0-based step `step`: gamma ** floor(epoch / step_epochs) (StepLR
    stepped at each epoch's start: epochs 1-9 lr, 10-19 lr * gamma, 20 lr * gamma**2)."""
    return gamma ** (epoch_of_step(step, n_steps, epochs) // step_epochs)


def build_senet_scheduler(optimizer: torch.optim.Optimizer, n_steps: int,
                          epochs: int = SENET_DEFAULTS["epochs"],
                          step_epochs: int = SENET_DEFAULTS["lr_step_epochs"],
                          gamma_segmenter: float = SENET_DEFAULTS["gamma_segmenter"],
                          gamma_conditioner: float = SENET_DEFAULTS["gamma_conditioner"]
                          ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler (call .step() after every optimiser step) for `build_senet_optimizer`'s groups."""
    gammas = {"segmenter": gamma_segmenter, "conditioner": gamma_conditioner}
    lambdas = [functools.partial(lr_factor, n_steps=n_steps, epochs=epochs, step_epochs=step_epochs,
                                 gamma=gammas[group["name"]])
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
