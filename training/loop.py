"""The training loop (train.py calls `train(config, run)`), readable top to bottom.

  1. validate the config, join the torchrun process group if any, pick the device, seed
  2. build the model, its optimiser and schedule (training/objective.py: SGD + MultiStepLR for the
     prototype models, SENet's per-arm SGD + scaled StepLR for SENet; a GradScaler for fp16 AMP)
  3. resume=True: load last.pth of the latest run of the same config (see `config_hash`)
  4. episodes: step t uses episodes t*B .. t*B+B-1 of `EpisodeDataset` (organ slices) or, with
     episodes='superpixels', `SelfSupEpisodeDataset` (self-supervised; a function of seed and index);
     DDP rank r of W takes episodes r, r+W, ... of them
  5. per step: the method's loss (training/objective.py: cross-entropy on the query logits
     (+ align_weight * align_loss when model.align), or SENet's Dice loss), backward, SGD step, scheduler step; tqdm bar with loss and lr; a summary line every print_every
  6. every val_every steps (and at the end): volumetric Dice on the held-out silver volumes
     (`evaluation.evaluate.validate`, split 'val', the fold's test organs) -> best.pth on improvement;
     every save_every steps (and at the end): last.pth. Only rank 0 validates and writes.
     Self-supervised runs on a folder without labeled held-out volumes skip validation (said at start):
     their snapshot is last.pth. path.init_from starts from another run's weights (fine-tuning).

"Same config" for resume: the SHA-256 of the resolved config without the keys that do not change
the trained weights' trajectory (`HASH_EXCLUDED`): resume, n_steps (so a run can be extended),
save/val/print frequencies, num_workers, device, eval.* and path.log_dir.
Test aid: env LSLPN_TEST_PAUSE_AFTER_SAVE=<seconds> sleeps after each last.pth write, so a test
can kill -9 the process at a known step.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import math
import os
import time
from typing import Any, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloaders.episodes import EpisodeDataset, StepBatchSampler
from dataloaders.selfsup_episodes import SelfSupEpisodeDataset
from dataloaders.prepared import prepared_intensity
from evaluation.evaluate import validate
from models.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from training.config_check import check_config, fold_training_classes, labeled_validation
from training.objective import build_model, build_optimisation, episode_loss
from util.device import (Distributed, autocast, distributed_from_env, get_rng_state, init_distributed,
                         make_grad_scaler, resolve_device, seed_everything, set_rng_state)
from util.errors import UserError
from util.provenance import git_commit, weights_digest

HASH_EXCLUDED = ("resume", "n_steps", "save_every", "val_every", "print_every", "num_workers", "device",
                 "eval", "path.log_dir")
PAUSE_ENV = "LSLPN_TEST_PAUSE_AFTER_SAVE"


# ------------------------------------------------------------------------------- run bookkeeping
def run_name(config: Mapping) -> str:
    """Folder under path.log_dir that holds this set-up's Sacred runs, e.g. 'lslpn_six_organs_fold0'."""
    if config.get("name"):
        return str(config["name"])
    if config["model"].get("method") == "senet":
        method = "senet"
    else:
        method = "panet" if config["model"]["n_grid"] == 1 else "lslpn"
    if config.get("episodes") == "superpixels":  # no organ is seen: one run serves every fold
        return f"{method}_selfsup"
    return f"{method}_{config['class_setting']}_fold{config['fold']}"


def build_episodes(cfg: Mapping):
    """The episode dataset of the config: organ slices ('labels') or superpixels ('superpixels')."""
    if cfg.get("episodes", "labels") == "superpixels":
        return SelfSupEpisodeDataset(cfg["path"]["data_dir"], cfg["n_ways"], cfg["n_shots"], cfg["n_queries"],
                                     cfg["input_size"], cfg["augment"], cfg["selfsup"]["warp"],
                                     cfg["selfsup"]["min_pixels"], cfg["seed"])
    return EpisodeDataset(cfg["path"]["data_dir"], fold_training_classes(cfg), cfg["n_ways"],
                          cfg["n_shots"], cfg["n_queries"], cfg["input_size"], cfg["augment"], cfg["seed"])


def config_hash(config: Mapping) -> str:
    """SHA-256 (16 hex digits) of the config minus HASH_EXCLUDED keys (dotted for nested ones)."""
    kept = json.loads(json.dumps(dict(config), default=str))  # plain types, a deep copy
    for key in HASH_EXCLUDED:
        *parents, leaf = key.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_resume_checkpoint(log_dir: str, name: str, wanted_hash: str, skip: tuple[str, ...] = ()) -> str | None:
    """last.pth of the latest (highest Sacred id) run under log_dir/name whose config hashes the same
    (runs whose last.pth is in `skip` are passed over)."""
    candidates = []
    for path in glob.glob(os.path.join(log_dir, name, "*", "last.pth")):
        run_dir = os.path.dirname(path)
        try:
            with open(os.path.join(run_dir, "config.json")) as handle:
                same = config_hash(json.load(handle)) == wanted_hash
            run_id = int(os.path.basename(run_dir))
        except (OSError, ValueError):
            continue
        if same and path not in skip:
            candidates.append((run_id, path))
    return max(candidates)[1] if candidates else None


def unreadable_resume_error(path: str, log_dir: str, name: str, wanted_hash: str) -> UserError:
    """The one-line error for a resume from an unreadable (e.g. truncated) last.pth, with the way out."""
    earlier = find_resume_checkpoint(log_dir, name, wanted_hash, skip=(path,))
    step = None
    if earlier is not None:
        try:
            step = int(load_checkpoint(earlier)["step"])
        except UserError:
            earlier = None
    moved = f"{path}.unreadable"
    if earlier is not None:
        how = (f"move it aside (mv {path} {moved}) and run again with resume=True: it then continues the earlier "
               f"run {earlier} at step {step}")
    else:
        how = (f"no earlier readable last.pth of this config exists; move it aside (mv {path} {moved}) and run "
               "again with resume=False to start fresh")
    return UserError(f"resume: {path} is unreadable (truncated or corrupt): {how}")


# ---------------------------------------------------------------------------------- the loop
def train(config: Mapping[str, Any], run=None) -> dict:
    """Train one fold as configured; `run` is the Sacred Run (metrics, info, run folder) or None."""
    check_config(config, "train")
    ctx = distributed_from_env()
    device = resolve_device(config["device"], ctx.local_rank)
    init_distributed(ctx, device)
    try:
        return _train(dict(config), run, ctx, device)
    finally:
        ctx.close()


def _train(cfg: dict, run, ctx: Distributed, device: torch.device) -> dict:
    run_dir = run.observers[0].dir if (run is not None and run.observers and ctx.is_main) else None
    chash = config_hash(cfg)
    if run is not None:
        run.info.update({"config_hash": chash, "git_commit": git_commit(), "world_size": ctx.world_size,
                         "device": str(device), "distributed_backend": ctx.backend})

    # Model, optimiser, schedule. Same seed on every rank: identical initial weights.
    seed_everything(cfg["seed"])
    model = build_model(cfg).to(device)
    if cfg["channels_last"]:  # CPU too (tests/test_gpu_proxies.py checks it there)
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimisation(cfg, model)
    scaler = make_grad_scaler(device, cfg["amp"])
    start_step, best_dice, rng_state = 0, None, None
    if cfg["path"].get("init_from"):  # fine-tuning: weights only (a resumed run's last.pth replaces them)
        state = load_checkpoint(cfg["path"]["init_from"], map_location=device)
        check_compatible(state["config"], model.config, cfg["path"]["init_from"])
        model.load_state_dict(state["model"])
        _say(ctx, f"initial weights from {cfg['path']['init_from']} (step {state.get('step')})")
    if cfg.get("episodes") == "superpixels" and cfg["val_every"] and cfg.get("val_split", "val") == "val" \
            and not labeled_validation(cfg):
        cfg["val_every"] = 0
        _say(ctx, f"validation off: {cfg['path']['data_dir']} has no labeled held-out volumes; the snapshot is "
                  f"last.pth after n_steps={cfg['n_steps']} (no best.pth)")

    if cfg["resume"]:
        path = find_resume_checkpoint(cfg["path"]["log_dir"], run_name(cfg), chash)
        if path is None:
            _say(ctx, f"resume: no earlier run of this config under {cfg['path']['log_dir']}/{run_name(cfg)}; "
                      "starting at step 0")
        else:
            try:
                state = load_checkpoint(path, map_location=device)
            except UserError:
                raise unreadable_resume_error(path, cfg["path"]["log_dir"], run_name(cfg), chash) from None
            check_compatible(state["config"], model.config, path)
            if state.get("config_hash") not in (None, chash):
                raise UserError(f"resume: {path} belongs to another config: start a new run (resume=False)")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_step, best_dice = int(state["step"]), state.get("best_dice")
            rngs = state.get("rng") or []
            rng_state = rngs[ctx.rank] if len(rngs) == ctx.world_size else None
            _say(ctx, f"resume: continuing {path} at step {start_step}")
            if run is not None:
                run.info["resumed_from"] = path
    # Per-rank random streams (dropout): restored on resume, else derived from (seed, rank).
    if rng_state is not None:
        set_rng_state(rng_state)
    else:
        seed_everything(cfg["seed"] + 100_003 * ctx.rank)

    net = model
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Episodes: a deterministic function of (seed, index); sharded per step across ranks.
    dataset = build_episodes(cfg)
    sampler = StepBatchSampler(start_step, cfg["n_steps"], cfg["batch_size"], ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg["seed"]))  # spares the global RNG

    n_steps = cfg["n_steps"]
    bar = tqdm(total=n_steps, initial=start_step, disable=not ctx.is_main, dynamic_ncols=True, desc="train")
    step_times, data_waits, window_loss, window_n = [], [], 0.0, 0   # seconds per step, waiting for data
    if start_step >= n_steps:
        _say(ctx, f"nothing to do: the run already has {start_step} >= n_steps={n_steps} steps")
    if cfg["val_every"] and cfg.get("val_split", "val") == "gold":
        _say(ctx, "warning: val_split='gold' selects best.pth on the TEST volumes (test-set model selection, "
                  "as the official code); its test Dice is optimistic")
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    for step, batch in zip(range(start_step, n_steps), loader):
        data_waits.append(time.perf_counter() - tic)  # the loader's next(): the device idles meanwhile
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        query_images = batch["query_images"]                                  # B x Q x 1 x H x W
        with autocast(device, cfg["amp"]):
            logits, align_loss = net(batch["support_images"], batch["support_fg"], batch["support_bg"],
                                     query_images)                            # B x Q x (1+N) x H x W
        loss = episode_loss(cfg, logits, batch["query_labels"], align_loss)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        done, value = step + 1, loss.item()  # .item() waits for the device: honest step times
        if not math.isfinite(value):
            raise UserError(f"training diverged at step {done} (loss {value}): lower lr or turn amp off")
        toc = time.perf_counter()
        step_times.append(toc - tic)
        window_loss, window_n = window_loss + value, window_n + 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if run is not None and ctx.is_main:
            run.log_scalar("loss", value, done)
            run.log_scalar("lr", lr, done)
        if done % cfg["print_every"] == 0 or done == n_steps:
            recent = step_times[-window_n:]
            waited = sum(data_waits[-window_n:]) / max(sum(recent), 1e-12)
            bar.write(f"step {done}/{n_steps}  loss {window_loss / window_n:.4f}  lr {lr:.2e}  "
                      f"{sum(recent) / len(recent):.3f} s/step  data wait {100 * waited:.0f}%")
            window_loss, window_n = 0.0, 0

        validate_now = bool(cfg["val_every"]) and (done % cfg["val_every"] == 0 or done == n_steps)
        save_now = done % cfg["save_every"] == 0 or done == n_steps
        if validate_now or save_now:
            ctx.broadcast_buffers(model)  # all ranks validate/save rank 0's BatchNorm statistics
        if validate_now:
            best_dice = _validate(cfg, model, device, ctx, run, run_dir, done, best_dice,
                                  lambda: _state(cfg, model, optimizer, scheduler, scaler, done, None,
                                                 chash, best_dice))
        if save_now:
            rngs = ctx.gather_objects(get_rng_state())  # collective: every rank takes part
            if run_dir is not None:
                save_checkpoint(os.path.join(run_dir, "last.pth"),
                                _state(cfg, model, optimizer, scheduler, scaler, done, rngs, chash, best_dice))
                if os.environ.get(PAUSE_ENV):
                    time.sleep(float(os.environ[PAUSE_ENV]))
        tic = time.perf_counter()
    bar.close()

    timed = step_times[1:] or step_times  # the first step includes warm-up
    sec_per_step = sum(timed) / len(timed) if timed else None
    # Data-wait fraction: time in the loader's next() / step time (steps 2..n); above ~10% on a GPU the
    # loader starves it (raise num_workers). Peak CUDA memory since the loop started.
    waits = data_waits[1:] if len(step_times) > 1 else data_waits
    digest = weights_digest(model)
    print(f"rank {ctx.rank}: final weights sha256 {digest}", flush=True)
    summary = {"steps": max(start_step, n_steps), "best_dice": best_dice, "run_dir": run_dir,
               "sec_per_step": sec_per_step, "weights_sha256": digest,
               "episodes_per_s": cfg["batch_size"] / sec_per_step if sec_per_step else None,
               "data_wait_fraction": min(1.0, sum(waits) / sum(timed)) if timed and sum(timed) > 0 else None,
               "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}
    if ctx.is_main and sec_per_step is not None:
        print(f"done: {len(step_times)} steps, {sec_per_step:.3f} s/step "
              f"({summary['episodes_per_s']:.2f} episodes/s, data wait {100 * (summary['data_wait_fraction'] or 0):.0f}%"
              + (f", peak CUDA {summary['cuda_peak_mb']:.0f} MB" if summary["cuda_peak_mb"] is not None else "")
              + f") on {device}; run folder {run_dir}")
    if run is not None:
        run.info.update({k: v for k, v in summary.items() if k != "run_dir"})
    return summary


def _state(cfg, model, optimizer, scheduler, scaler, step, rngs, chash, best_dice) -> dict:
    """Everything a checkpoint holds (models/checkpoint.py lists the keys)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "step": step, "rng": rngs, "config": copy.deepcopy(model.config),
            "fold": None if cfg.get("episodes") == "superpixels" else cfg["fold"],   # selfsup: no organ seen
            "seed": cfg["seed"], "config_hash": chash, "run_config": copy.deepcopy(cfg),
            "best_dice": best_dice, "input_size": cfg["input_size"], "intensity": prepared_intensity(cfg["path"]["data_dir"])}



def _validate(cfg, model, device, ctx, run, run_dir, step, best_dice, make_state):
    """Rank 0: volumetric Dice on the `val_split` split ('val': held-out silver volumes; 'gold': the
    test volumes, as the official code); best.pth when it improves. Returns the best Dice."""
    if ctx.is_main:
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
        tqdm.write(f"step {step}: validation Dice {dice:.4f} ({', '.join(f'{k} {v:.4f}' for k, v in result['per_organ'].items())})"
                   + ("  best so far" if improved else ""))
        if improved:
            best_dice = dice
            if run_dir is not None:
                state = make_state()
                state["best_dice"] = best_dice
                save_checkpoint(os.path.join(run_dir, "best.pth"), state)
    ctx.barrier()
    if ctx.enabled:  # every rank keeps the same best value (it goes into each rank's checkpoints)
        best_dice = ctx.gather_objects(best_dice)[0]
    return best_dice


def _say(ctx: Distributed, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)
