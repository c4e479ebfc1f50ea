"""What the one training loop (training/loop.py) builds and minimises, per method.

  prototype (LSLPN, PANet; model.method 'prototype'): SGD(lr, momentum, weight_decay) over all
      trainable parameters, MultiStepLR(lr_milestones, lr_gamma), cross-entropy on the query logits
      (model.head 'alpnet': SSL-ALPNet's, background weight 0.05) (+ boundary_weight x the boundary
      loss of Kervadec et al., models/boundary_loss.py, when boundary_weight > 0; beyond the paper)
      (+ model.align_weight x the alignment loss when model.align).
  senet (model.method 'senet'): SENet's own optimisation (training/senet_schedule.py): per-arm
      SGD parameter groups with lr, momentum, weight_decay, the 20-epoch StepLR schedule scaled to
      n_steps (senet.epochs, senet.lr_step_epochs, senet.gamma_segmenter, senet.gamma_conditioner;
      lr_milestones and lr_gamma unused), Dice loss on softmax(logits) (senet.double_softmax: on
      softmax(softmax(logits)) as the official training).
The loop calls `build_model`, `build_optimisation` and `episode_loss` and nothing method-specific.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from models.alpnet_head import query_loss as alpnet_query_loss
from models.boundary_loss import boundary_loss
from models.factory import SENET, method_of
from models.factory import build_model as _build
from models.senet import senet_loss
from training.senet_schedule import build_senet_optimizer, build_senet_scheduler

SENET_DEFAULTS = {"official_bug": False, "double_softmax": False, "epochs": 20, "lr_step_epochs": 10,
                  "gamma_segmenter": 0.1, "gamma_conditioner": 0.001}


def senet_options(cfg: Mapping) -> dict:
    """The run config's `senet` dict with defaults for missing keys."""
    return {**SENET_DEFAULTS, **dict(cfg.get("senet") or {})}


def model_config(cfg: Mapping) -> dict:
    """The model config dict of a run config: `model`, plus senet.official_bug for SENet."""
    config = dict(cfg["model"])
    if method_of(config) == SENET:
        config["official_bug"] = bool(senet_options(cfg)["official_bug"])
    return config


def build_model(cfg: Mapping) -> torch.nn.Module:
    """The run's model (models/factory.py), on the CPU."""
    return _build(model_config(cfg), cfg["path"]["init_path"])


def build_optimisation(cfg: Mapping, model: torch.nn.Module):
    """(optimizer, scheduler) of the run's method; the scheduler is stepped after every step."""
    if method_of(cfg["model"]) == SENET:
        options = senet_options(cfg)
        optimizer = build_senet_optimizer(model, cfg["lr"], cfg["momentum"], cfg["weight_decay"])
        scheduler = build_senet_scheduler(optimizer, cfg["n_steps"], options["epochs"],
                                          options["lr_step_epochs"],
                                          options["gamma_segmenter"], options["gamma_conditioner"])
        return optimizer, scheduler
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                                momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg["lr_milestones"]),
                                                     gamma=cfg["lr_gamma"])
    return optimizer, scheduler


def episode_loss(cfg: Mapping, logits: Tensor, labels: Tensor, aux_loss: Tensor) -> Tensor:
    """The training loss of one batch: logits B x Q x C x H x W, labels B x Q x H x W (int)."""
    if method_of(cfg["model"]) == SENET:
        return senet_loss(logits, labels, bool(senet_options(cfg)["double_softmax"]))
    if cfg["model"].get("head") == "alpnet":   # SSL-ALPNet's query loss: background weight 0.05
        loss = alpnet_query_loss(logits, labels)
    else:  # ignore_index 255 as the official code (our query labels are 0..N: no pixel is ignored)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(0, 1), ignore_index=255)
    boundary_weight = float(cfg.get("boundary_weight", 0.0))
    if boundary_weight:      # 0 (the default): not computed, the loss is bit-equal to the loss without it
        loss = loss + boundary_weight * boundary_loss(logits, labels)
    if cfg["model"].get("align", False):
        loss = loss + float(cfg["model"].get("align_weight", 1.0)) * aux_loss.float()
    return loss
