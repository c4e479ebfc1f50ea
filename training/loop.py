"""The training loop: train.py calls `train(config, run)`, which reads top to bottom.

  build     check the config, join the torchrun process group if any, pick the device, seed; the
            model, its optimiser and schedule (training/objective.py: SGD + MultiStepLR for the
            prototype models, SENet's per-arm SGD + scaled StepLR for SENet) and one GradScaler
            (enabled for fp16 autocast only)
  restore   path.init_from: start from another run's weights (fine-tuning); resume=True: continue
            last.pth of the latest run of the same config (training/runs.py says what "same" is and
            names the differing keys when only another config's run exists: a new run starts)
  loop      step t uses episodes t*B .. t*B+B-1 of `EpisodeDataset` (organ slices) or, with
            episodes='superpixels', `SelfSupEpisodeDataset` (a function of seed and index); DDP rank
            r of W takes episodes r, r+W, ... of them. Per step: the method's loss (cross-entropy on
            the query logits (+ align_weight * align_loss when model.align), or SENet's Dice loss),
            backward, optimiser step, scheduler step; a non-finite loss stops the run with one line
  validate  every val_every steps (and at the end) rank 0 computes the volumetric Dice on the
  / save    held-out silver volumes (`evaluation.evaluate.validate`, split 'val', the fold's test
            organs) -> best.pth on improvement; every save_every steps (and at the end) last.pth.
            Non-finite weights stop the run before either (the last good checkpoint stays).
            Self-supervised runs on a folder without labeled held-out volumes skip validation (said
            at start): their snapshot is last.pth.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any, Iterator, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloaders.episodes import EpisodeDataset, StepBatchSampler
from dataloaders.prepared import prepared_intensity
from dataloaders.selfsup_episodes import REDRAWS_KEY, SelfSupEpisodeDataset
from evaluation.evaluate import validate
from models.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from training.config_check import check_config, fold_training_classes, labeled_validation
from training.meter import StepMeter
from training.objective import build_model, build_optimisation, episode_loss
from training.runs import (
    config_hash,
    config_mismatch,
    find_resume_checkpoint,
    run_name,
    unreadable_resume_error,
)
from util.device import (
    Distributed,
    amp_dtype,
    autocast,
    distributed_from_env,
    get_rng_state,
    init_distributed,
    resolve_device,
    seed_everything,
    set_rng_state,
)
from util.errors import UserError
from util.provenance import git_commit, weights_digest

RANK_SEED_STRIDE = 100_003   # rank r's dropout stream starts from seed + r * stride


def train(config: Mapping[str, Any], run=None, *, defaults: Mapping, checked: bool = False) -> dict:
    """Train one fold as configured; `run` is the Sacred Run (metrics, info, run folder) or None;
    `defaults`: the default config (config.default_config(): a run is hashed by its differences).
    checked=True: the caller ran check_config on this config already (train.py, once per command)."""
    if not checked:
        check_config(config, "train")
    cfg = dict(config)
    with _process_group(cfg["device"]) as (dist, device):
        # ---- build (same seed on every rank: identical initial weights)
        run_dir = run.observers[0].dir if (run is not None and run.observers and dist.is_main) else None
        config_digest = config_hash(cfg, defaults)
        if run is not None:
            run.info.update({"config_hash": config_digest, "git_commit": git_commit(),
                             "world_size": dist.world_size, "device": str(device),
                             "distributed_backend": dist.backend})
        seed_everything(cfg["seed"])
        model = build_model(cfg).to(device)
        if cfg["channels_last"]:  # CPU too (tests/test_gpu_proxies.py checks it there)
            model = model.to(memory_format=torch.channels_last)
        optimizer, scheduler = build_optimisation(cfg, model)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg["amp"]) == torch.float16)

        # ---- restore: initial weights, validation plan, resume, per-rank random streams
        if cfg["path"].get("init_from"):  # weights only; a resumed run's last.pth replaces them
            _load_initial_weights(cfg["path"]["init_from"], model, device, dist)
        _plan_validation(cfg, dist)
        start_step, best_dice, rng_state = 0, None, None
        if cfg["resume"]:
            start_step, best_dice, rng_state = _resume(cfg, run, dist, device, config_digest, defaults,
                                                       model, optimizer, scheduler, scaler)
        if rng_state is not None:  # dropout streams: restored on resume, else derived from (seed, rank)
            set_rng_state(rng_state)
        else:
            seed_everything(cfg["seed"] + RANK_SEED_STRIDE * dist.rank)
        net = model
        if dist.enabled:
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        loader = _episode_loader(cfg, dist, device, start_step)

        def checkpoint(step: int, rngs: list | None) -> dict:
            return _state(cfg, model, optimizer, scheduler, scaler, step, rngs, config_digest, best_dice)

        # ---- loop
        n_steps = cfg["n_steps"]
        if start_step >= n_steps:
            _say(dist, f"nothing to do: the run already has {start_step} >= n_steps={n_steps} steps")
        bar = tqdm(total=n_steps, initial=start_step, disable=not dist.is_main, dynamic_ncols=True,
                   desc="train")
        meter, last_saved = StepMeter(), None
        redraws = 0   # self-supervised draws discarded because the support lost its superpixel
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            for step, batch in zip(range(start_step, n_steps), loader):
                meter.batch_arrived()
                redraws += int(batch.pop(REDRAWS_KEY).sum()) if REDRAWS_KEY in batch else 0
                loss, lr = _optimisation_step(cfg, net, model, batch, device, optimizer, scheduler, scaler)
                done = step + 1
                if not math.isfinite(loss):
                    raise _divergence_error(cfg, dist, done, f"loss {loss}", last_saved)
                meter.step_finished(loss)
                _log_step(cfg, run, dist, bar, meter, done, loss, lr)

                # ---- validate / save
                validate_now = bool(cfg["val_every"]) and (done % cfg["val_every"] == 0 or done == n_steps)
                save_now = done % cfg["save_every"] == 0 or done == n_steps
                if validate_now or save_now:
                    dist.broadcast_buffers(model)  # all ranks validate/save rank 0's BatchNorm statistics
                    if not _weights_finite(model):
                        raise _divergence_error(cfg, dist, done, "non-finite weights", last_saved)
                if validate_now:
                    best_dice = _validate(cfg, model, device, dist, run, run_dir, done, best_dice,
                                          lambda: checkpoint(done, None))
                if save_now:
                    rngs = dist.gather_objects(get_rng_state())  # collective: every rank takes part
                    if run_dir is not None:
                        save_checkpoint(os.path.join(run_dir, "last.pth"), checkpoint(done, rngs))
                        last_saved = (os.path.join(run_dir, "last.pth"), done)
                meter.restart()
        finally:
            bar.close()   # an error line then starts on a line of its own
        if cfg.get("episodes") == "superpixels":
            _say(dist, f"episodes redrawn: {redraws} (the support lost its superpixel under resize or warp; "
                       "dataloaders/selfsup_episodes.py)")
            if run is not None:
                run.info["episode_redraws"] = redraws
        return _finish(cfg, run, dist, device, model, meter, start_step, best_dice, run_dir)


# ------------------------------------------------------------------------------- build
@contextlib.contextmanager
def _process_group(device_name: str) -> Iterator[tuple[Distributed, torch.device]]:
    """This process's place in a torchrun job (joined for the block) and its device."""
    dist = distributed_from_env()
    device = resolve_device(device_name, dist.local_rank)
    init_distributed(dist, device)
    try:
        yield dist, device
    finally:
        dist.close()


def build_episodes(cfg: Mapping):
    """The episode dataset of the config: organ slices ('labels') or superpixels ('superpixels'), with
    model.input_slices channels per image (1, or 3 for 2.5D input)."""
    input_slices = int(cfg["model"].get("input_slices", 1))
    if cfg.get("episodes", "labels") == "superpixels":
        return SelfSupEpisodeDataset(cfg["path"]["data_dir"], cfg["n_ways"], cfg["n_shots"], cfg["n_queries"],
                                     cfg["input_size"], cfg["augment"], cfg["selfsup"]["warp"],
                                     cfg["selfsup"]["min_pixels"], cfg["seed"],
                                     recipe=cfg["selfsup"].get("episodes", "project"),
                                     input_slices=input_slices)
    return EpisodeDataset(cfg["path"]["data_dir"], fold_training_classes(cfg), cfg["n_ways"],
                          cfg["n_shots"], cfg["n_queries"], cfg["input_size"], cfg["augment"], cfg["seed"],
                          input_slices=input_slices)


def _episode_loader(cfg: Mapping, dist: Distributed, device: torch.device, start_step: int) -> DataLoader:
    """Episodes from `start_step` on: a deterministic function of (seed, index), sharded per step
    across ranks."""
    sampler = StepBatchSampler(start_step, cfg["n_steps"], cfg["batch_size"], dist.rank, dist.world_size)
    return DataLoader(build_episodes(cfg), batch_sampler=sampler, num_workers=cfg["num_workers"],
                      pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg["seed"]))  # spares the global RNG


def _plan_validation(cfg: dict, dist: Distributed) -> None:
    """Switch validation off for a self-supervised run without labeled held-out volumes; warn about 'gold'."""
    if cfg.get("episodes") == "superpixels" and cfg["val_every"] and cfg.get("val_split", "val") == "val" \
            and not labeled_validation(cfg):
        cfg["val_every"] = 0
        _say(dist, f"validation off: {cfg['path']['data_dir']} has no labeled held-out volumes; the snapshot "
                   f"is last.pth after n_steps={cfg['n_steps']} (no best.pth)")
    if cfg["val_every"] and cfg.get("val_split", "val") == "gold":
        _say(dist, "warning: val_split='gold' selects best.pth on the TEST volumes (test-set model "
                   "selection, as the official code); its test Dice is optimistic")


# ------------------------------------------------------------------------------- restore
def _load_initial_weights(path: str, model: torch.nn.Module, device: torch.device, dist: Distributed) -> None:
    """path.init_from: the model weights of another run's checkpoint (optimiser and step start fresh)."""
    state = load_checkpoint(path, map_location=device)
    check_compatible(state["config"], model.config, path)
    model.load_state_dict(state["model"])
    _say(dist, f"initial weights from {path} (step {state.get('step')})")


def _resume(cfg, run, dist, device, config_digest, defaults, model, optimizer, scheduler, scaler):
    """resume=True: load last.pth of the latest run of this config into model, optimiser, schedule and
    scaler. Returns (start step, best Dice, this rank's RNG state or None); (0, None, None) when no
    run of this config exists (the line printed says why a new run starts)."""
    log_dir, name = cfg["path"]["log_dir"], run_name(cfg)
    path = find_resume_checkpoint(log_dir, name, config_digest, defaults)
    if path is None:
        _say(dist, config_mismatch(cfg, log_dir, name, defaults)
             or f"resume: no earlier run of this config under {log_dir}/{name}; starting at step 0")
        return 0, None, None
    try:
        state = load_checkpoint(path, map_location=device)
    except UserError:
        raise unreadable_resume_error(path, log_dir, name, config_digest, defaults) from None
    check_compatible(state["config"], model.config, path)
    if state.get("config_hash") not in (None, config_digest):
        raise UserError(f"resume: {path} belongs to another config: start a new run (resume=False)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    _say(dist, f"resume: continuing {path} at step {int(state['step'])}")
    if run is not None:
        run.info["resumed_from"] = path
    rng_state = rngs[dist.rank] if len(rngs) == dist.world_size else None
    return int(state["step"]), state.get("best_dice"), rng_state


# ------------------------------------------------------------------------------- one step
def _optimisation_step(cfg, net, model, batch, device, optimizer, scheduler, scaler) -> tuple[float, float]:
    """Forward, loss, backward, (clip,) optimiser and scheduler step; returns (loss, lr used)."""
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    with autocast(device, cfg["amp"]):
        logits, align_loss = net(batch["support_images"], batch["support_fg"], batch["support_bg"],
                                 batch["query_images"])                     # B x Q x (1+N) x H x W
    loss = episode_loss(cfg, logits, batch["query_labels"], align_loss)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()           # a disabled scaler passes the loss through unchanged
    scaler.unscale_(optimizer)
    if cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    scaler.step(optimizer)                   # disabled: optimizer.step()
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    return loss.item(), lr                   # .item() waits for the device: honest step times


def _log_step(cfg, run, dist, bar, meter: StepMeter, done: int, loss: float, lr: float) -> None:
    """Progress bar, Sacred metrics (rank 0), and a summary line every print_every steps and at the end."""
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    if run is not None and dist.is_main:
        run.log_scalar("loss", loss, done)
        run.log_scalar("lr", lr, done)
    if done % cfg["print_every"] == 0 or done == cfg["n_steps"]:
        mean_loss, sec_per_step, waited = meter.window()
        bar.write(f"step {done}/{cfg['n_steps']}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                  f"{sec_per_step:.3f} s/step  data wait {100 * waited:.0f}%")


def _weights_finite(model: torch.nn.Module) -> bool:
    """Every floating-point parameter and buffer is finite (one device sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _divergence_error(cfg: Mapping, dist: Distributed, step: int, what: str,
                      last_saved: tuple[str, int] | None) -> UserError:
    """The one line for a run whose loss or weights stopped being finite: the step, the fix, what stays."""
    fixes = [f"lower lr (now {cfg['lr']:g})"]
    if cfg["grad_clip"] <= 0:
        fixes.append("set grad_clip (e.g. 1.0)")
    if cfg["amp"]:
        fixes.append("turn amp off")
    if last_saved is not None:
        kept = f"{last_saved[0]} (step {last_saved[1]}) stays the last good checkpoint"
    else:
        kept = ("no checkpoint of this run was written" if dist.is_main
                else "rank 0 keeps its last good checkpoint")
    return UserError(f"training diverged at step {step} ({what}): {', '.join(fixes[:-1])}"
                     f"{' or ' if len(fixes) > 1 else ''}{fixes[-1]}; {kept}")


# ------------------------------------------------------------------------------- validate / save
def _state(cfg, model, optimizer, scheduler, scaler, step, rngs, config_digest, best_dice) -> dict:
    """Everything a checkpoint holds (models/checkpoint.py lists the keys)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": step, "rng": rngs, "config": copy.deepcopy(model.config),
            "fold": None if cfg.get("episodes") == "superpixels" else cfg["fold"],   # selfsup: no organ seen
            "seed": cfg["seed"], "config_hash": config_digest, "run_config": copy.deepcopy(cfg),
            "best_dice": best_dice, "input_size": cfg["input_size"],
            "intensity": prepared_intensity(cfg["path"]["data_dir"])}


def _validate(cfg, model, device, dist, run, run_dir, step, best_dice, make_state):
    """Rank 0: volumetric Dice on the `val_split` split ('val': held-out silver volumes; 'gold': the
    test volumes, as the official code); best.pth when it improves. Returns the best Dice."""
    if dist.is_main:
        organs = list(cfg["label_sets"][cfg["fold"]])
        result = validate(model, cfg["path"]["data_dir"], split=cfg.get("val_split", "val"), organs=organs,
                          preset=cfg["eval"]["preset"], input_size=cfg["input_size"], device=device,
                          batch_size=cfg["eval"]["batch_size"])
        dice = float(result["mean_dice"])
        if run is not None:
            run.log_scalar("val_dice", dice, step)
            for organ, value in result["per_organ"].items():
                run.log_scalar(f"val_dice_{organ}", float(value), step)
        improved = math.isfinite(dice) and (best_dice is None or dice > best_dice)
        per_organ = ", ".join(f"{k} {v:.4f}" for k, v in result["per_organ"].items())
        tqdm.write(f"step {step}: validation Dice {dice:.4f} ({per_organ})"
                   + ("  best so far" if improved else ""))
        if improved:
            best_dice = dice
            if run_dir is not None:
                state = make_state()
                state["best_dice"] = best_dice
                save_checkpoint(os.path.join(run_dir, "best.pth"), state)
    dist.barrier()
    if dist.enabled:  # every rank keeps the same best value (it goes into each rank's checkpoints)
        best_dice = dist.gather_objects(best_dice)[0]
    return best_dice


def _finish(cfg, run, dist, device, model, meter: StepMeter, start_step, best_dice, run_dir) -> dict:
    """The final weights' digest, the run's summary (Sacred's result and info.json) and the 'done' line."""
    digest = weights_digest(model)
    print(f"rank {dist.rank}: final weights sha256 {digest}", flush=True)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    summary = {"steps": max(start_step, cfg["n_steps"]), "best_dice": best_dice, "run_dir": run_dir,
               **meter.summary(cfg["batch_size"]), "weights_sha256": digest, "cuda_peak_mb": peak_mb}
    if dist.is_main and summary["sec_per_step"] is not None:
        peak = f", peak CUDA {peak_mb:.0f} MB" if peak_mb is not None else ""
        waited = 100 * (summary["data_wait_fraction"] or 0)
        print(f"done: {meter.steps} steps, {summary['sec_per_step']:.3f} s/step "
              f"({summary['episodes_per_s']:.2f} episodes/s, data wait {waited:.0f}%{peak}) on {device}; "
              f"run folder {run_dir}", flush=True)
    if run is not None:
        run.info.update({k: v for k, v in summary.items() if k != "run_dir"})
    return summary


def _say(dist: Distributed, message: str) -> None:
    if dist.is_main:
        print(message, flush=True)
