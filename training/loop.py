"""The training loop, `train(config, run, defaults=...)`: build -> restore (init_from, resume) -> loop
(step t takes episodes t*B .. t*B+B-1, DDP rank r every W-th) -> validate (best.pth) / save (last.pth).
Its state is one `Trainer`; below it the step meter, the walker of run folders log_dir/<name>/<id>/ and
`config_hash` (which runs are the same). docs/DESIGN.md, "Training".
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloaders.episodes import REDRAWS_KEY, EpisodeDataset, StepBatchSampler
from dataloaders.prepared import prepared_intensity
from dataloaders.selfsup_episodes import REDRAW_REASONS, SelfSupEpisodeDataset
from evaluation.evaluate import validate
from models.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from training.config_check import check_config, fold_training_classes, held_out
from training.objective import build_model, build_optimisation, episode_loss
from util.device import (
    Distributed,
    autocast,
    distributed_from_env,
    get_rng_state,
    init_distributed,
    make_grad_scaler,
    resolve_device,
    seed_everything,
    set_rng_state,
)
from util.errors import UserError
from util.io import write_bytes_atomic
from util.options import flatten
from util.provenance import git_commit, weights_digest

RANK_SEED_STRIDE = 100_003   # rank r's dropout stream starts from seed + r * stride
# keys that leave the trained weights unchanged: a resumed run takes their new values
HASH_EXCLUDED = ("resume", "n_steps", "save_every", "val_every", "print_every", "num_workers", "device",
                 "eval", "path.log_dir")
ABSENT = "(absent)"
RUN_ID = re.compile(r"[0-9]+")
SHOWN_DIFFERENCES = 6   # a mismatch line names at most this many keys (then "and N more")


@dataclass
class Trainer:
    """The loop's state: what `_build` made, where the run is, what it keeps."""
    cfg: dict
    dist: Distributed
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    digest: str                              # config_hash
    run: Any = None                          # Sacred's Run (metrics, info) or None
    run_dir: str | None = None               # rank 0's run folder; None: no file is written
    step: int = 0                            # steps done
    best_dice: float | None = None
    last_saved: tuple[str, int] | None = None   # (last.pth, its step)
    redraws: Any = 0                         # draws whose support lost its organ (a count) or superpixel
                                             # (a tensor of counts by REDRAW_REASONS)

    def say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def checkpoint(self, rngs: list | None) -> dict:
        """Everything a checkpoint holds (models/checkpoint.py lists the keys)."""
        cfg, scaler = self.cfg, self.scaler
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "step": self.step, "rng": rngs, "model_config": copy.deepcopy(self.model.config),
                "fold": None if cfg["episodes"] == "superpixels" else cfg["fold"],   # selfsup: no organ seen
                "seed": cfg["seed"], "config_hash": self.digest, "run_config": copy.deepcopy(cfg),
                "best_dice": self.best_dice, "input_size": cfg["input_size"],
                "intensity": prepared_intensity(cfg["path"]["data_dir"])}


def train(config: Mapping[str, Any], run=None, *, defaults: Mapping, checked: bool = False) -> dict:
    """Train one fold; `run`: Sacred's Run or None; `defaults`: config.default_config() (for config_hash);
    checked: the caller (train.py) ran check_config already."""
    if not checked:
        check_config(config, "train")
    cfg = dict(config)
    dist = distributed_from_env()                      # this process's place in a torchrun job
    device = resolve_device(cfg["device"], dist.local_rank)
    init_distributed(dist, device)
    try:
        t = _build(cfg, run, dist, device, defaults)
        _restore(t, defaults)
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(t.model, device_ids=ids) if dist.enabled else t.model
        loader = _episode_loader(cfg, dist, device, t.step)
        start_step, n_steps = t.step, cfg["n_steps"]
        if start_step >= n_steps:
            t.say(f"nothing to do: the run already has {start_step} >= n_steps={n_steps} steps")
        bar = tqdm(total=n_steps, initial=start_step, disable=not dist.is_main, dynamic_ncols=True,
                   desc="train")
        meter = StepMeter()
        t.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            for step, batch in zip(range(start_step, n_steps), loader):
                meter.batch_arrived()
                t.redraws = t.redraws + batch.pop(REDRAWS_KEY).sum(0)
                loss, lr = _optimisation_step(t, net, batch)
                t.step = done = step + 1
                if not math.isfinite(loss):
                    raise _divergence_error(t, f"loss {loss}")
                meter.step_finished(loss)
                _log_step(t, bar, meter, loss, lr)

                # ---- validate / save
                validate_now = bool(cfg["val_every"]) and (done % cfg["val_every"] == 0 or done == n_steps)
                save_now = done % cfg["save_every"] == 0 or done == n_steps
                if validate_now or save_now:
                    dist.broadcast_buffers(t.model)  # all ranks validate/save rank 0's BatchNorm statistics
                    if not _weights_finite(t.model):
                        raise _divergence_error(t, "non-finite weights")
                if validate_now:
                    _validate(t)
                if save_now:
                    rngs = dist.gather_objects(get_rng_state())  # collective: every rank takes part
                    if t.run_dir is not None:
                        path = os.path.join(t.run_dir, "last.pth")
                        save_checkpoint(path, t.checkpoint(rngs))
                        t.last_saved = (path, done)
                meter.restart()
        finally:
            bar.close()   # an error line then starts on a line of its own
        return _finish(t, meter, start_step, loader.dataset)
    finally:
        dist.close()


# ------------------------------------------------------------------------------- build and restore
def _build(cfg: dict, run, dist: Distributed, device: torch.device, defaults: Mapping) -> Trainer:
    """Model (the same initial weights on every rank), optimiser, schedule and GradScaler (fp16 only)."""
    run_dir = run.observers[0].dir if (run is not None and run.observers and dist.is_main) else None
    digest = config_hash(cfg, defaults)
    if run is not None:
        run.info.update({"config_hash": digest, "git_commit": git_commit(), "world_size": dist.world_size,
                         "device": str(device), "distributed_backend": dist.backend})
    seed_everything(cfg["seed"])
    model = build_model(cfg).to(device)
    if cfg["channels_last"]:  # CPU too (tests/test_gpu_proxies.py checks it there)
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimisation(cfg, model)
    scaler = make_grad_scaler(device, cfg["amp"])
    return Trainer(cfg, dist, device, model, optimizer, scheduler, scaler, digest, run, run_dir)


def _restore(t: Trainer, defaults: Mapping) -> None:
    """Initial weights (path.init_from), the validation plan, resume, then each rank's random streams."""
    cfg, path = t.cfg, t.cfg["path"].get("init_from")
    if path:  # weights only; a resumed run's last.pth replaces them
        state = load_checkpoint(path, map_location=t.device)
        check_compatible(state["model_config"], t.model.config, path)
        t.model.load_state_dict(state["model"])
        t.say(f"initial weights from {path} (step {state.get('step')})")
    if cfg["episodes"] == "superpixels" and cfg["val_every"] and cfg["val_split"] == "val" \
            and not held_out(cfg, "val")[1]:
        cfg["val_every"] = 0
        t.say(f"validation off: {cfg['path']['data_dir']} has no labeled held-out volumes; the snapshot "
              f"is last.pth after n_steps={cfg['n_steps']} (no best.pth)")
    if cfg["val_every"] and cfg["val_split"] == "gold":
        t.say("warning: val_split='gold' selects best.pth on the TEST volumes (test-set model "
              "selection, as the official code); its test Dice is optimistic")
    rng_state = _resume(t, defaults) if cfg["resume"] else None
    if rng_state is not None:  # dropout streams: restored on resume, else derived from (seed, rank)
        set_rng_state(rng_state)
    else:
        seed_everything(cfg["seed"] + RANK_SEED_STRIDE * t.dist.rank)


def _resume(t: Trainer, defaults: Mapping):
    """Load last.pth of the latest run of this config into `t`; this rank's RNG state, or None (also when
    there is no such run: the line printed says why a new run starts)."""
    log_dir, name = t.cfg["path"]["log_dir"], run_name(t.cfg)
    path = find_resume_checkpoint(log_dir, name, t.digest, defaults)
    if path is None:
        t.say(config_mismatch(t.cfg, log_dir, name, defaults)
              or f"resume: no earlier run of this config under {log_dir}/{name}; starting at step 0")
        return None
    try:
        state = load_checkpoint(path, map_location=t.device)
    except UserError:
        raise unreadable_resume_error(path, log_dir, name, t.digest, defaults) from None
    check_compatible(state["model_config"], t.model.config, path)
    for part in ("model", "optimizer", "scheduler"):
        getattr(t, part).load_state_dict(state[part])
    if t.scaler.is_enabled() and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    t.step, t.best_dice = int(state["step"]), state.get("best_dice")
    earlier_best = Path(path).with_name("best.pth")
    if t.run_dir is not None and earlier_best.is_file():   # the best snapshot so far moves on with the run
        write_bytes_atomic(earlier_best.read_bytes(), Path(t.run_dir, "best.pth"))
    t.say(f"resume: continuing {path} at step {t.step}")
    if t.run is not None:
        t.run.info["resumed_from"] = path
    rngs = state.get("rng") or []
    return rngs[t.dist.rank] if len(rngs) == t.dist.world_size else None


def _episode_loader(cfg: Mapping, dist: Distributed, device: torch.device, start_step: int) -> DataLoader:
    """Episodes from `start_step` on (a function of (seed, index)), sharded per step across ranks."""
    sampler = StepBatchSampler(start_step, cfg["n_steps"], cfg["batch_size"], dist.rank, dist.world_size)
    if cfg["episodes"] == "superpixels":
        selfsup = cfg["selfsup"]
        episodes = SelfSupEpisodeDataset(cfg["path"]["data_dir"], cfg["n_ways"], cfg["n_shots"],
                                         cfg["n_queries"], cfg["input_size"], cfg["augment"], selfsup["warp"],
                                         selfsup["min_pixels"], cfg["seed"], recipe=selfsup["episodes"],
                                         input_slices=cfg["model"]["input_slices"])
    else:
        episodes = EpisodeDataset(cfg["path"]["data_dir"], fold_training_classes(cfg), cfg["n_ways"],
                                  cfg["n_shots"], cfg["n_queries"], cfg["input_size"], cfg["augment"],
                                  cfg["seed"], input_slices=cfg["model"]["input_slices"])
    return DataLoader(episodes, batch_sampler=sampler, num_workers=cfg["num_workers"],
                      pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg["seed"]))  # spares the global RNG


# ------------------------------------------------------------------------------- one step
def _optimisation_step(t: Trainer, net: torch.nn.Module, batch: dict) -> tuple[float, float]:
    """Forward, loss, backward, (clip,) optimiser and scheduler step; returns (loss, lr used)."""
    batch = {key: value.to(t.device, non_blocking=True) for key, value in batch.items()}
    with autocast(t.device, t.cfg["amp"]):
        logits, align_loss = net(batch["support_images"], batch["support_fg"], batch["support_bg"],
                                 batch["query_images"])                     # B x Q x (1+N) x H x W
    loss = episode_loss(t.cfg, logits, batch["query_labels"], align_loss)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()         # a disabled scaler passes the loss through unchanged
    t.scaler.unscale_(t.optimizer)
    if t.cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg["grad_clip"])
    t.scaler.step(t.optimizer)               # disabled: optimizer.step()
    t.scaler.update()
    lr = t.optimizer.param_groups[0]["lr"]
    t.scheduler.step()
    return loss.item(), lr                   # .item() waits for the device: honest step times


def _log_step(t: Trainer, bar: tqdm, meter: StepMeter, loss: float, lr: float) -> None:
    """Progress bar, Sacred metrics (rank 0), and a summary line every print_every steps and at the end."""
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    if t.run is not None and t.dist.is_main:
        t.run.log_scalar("loss", loss, t.step)
        t.run.log_scalar("lr", lr, t.step)
    if t.step % t.cfg["print_every"] == 0 or t.step == t.cfg["n_steps"]:
        mean_loss, sec_per_step, waited = meter.window()
        bar.write(f"step {t.step}/{t.cfg['n_steps']}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                  f"{sec_per_step:.3f} s/step  data wait {100 * waited:.0f}%")


def _weights_finite(model: torch.nn.Module) -> bool:
    """Every floating-point parameter and buffer is finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in model.state_dict().values()
                             if t.is_floating_point()] or [torch.tensor(True)]).all())


def _divergence_error(t: Trainer, what: str) -> UserError:
    """The one line for a run whose loss or weights stopped being finite: the step, the fix, what stays."""
    cfg = t.cfg
    fixes = [f"lower lr (now {cfg['lr']:g})", *["set grad_clip (e.g. 1.0)"] * (cfg["grad_clip"] <= 0),
             *["turn amp off"] * bool(cfg["amp"])]
    kept = (f"{t.last_saved[0]} (step {t.last_saved[1]}) stays the last good checkpoint" if t.last_saved else
            "no checkpoint of this run was written" if t.dist.is_main else
            "rank 0 keeps its last good checkpoint")
    return UserError(f"training diverged at step {t.step} ({what}): {', '.join(fixes[:-1])}"
                     f"{' or ' if len(fixes) > 1 else ''}{fixes[-1]}; {kept}")


# ------------------------------------------------------------------------------- validate / finish
def _validate(t: Trainer) -> None:
    """Rank 0: volumetric Dice on `val_split` ('val': held-out silver volumes; 'gold': the test volumes,
    as the official code); best.pth when it improves. Every rank ends with the same best Dice."""
    cfg = t.cfg
    if t.dist.is_main:
        result = validate(t.model, cfg["path"]["data_dir"], split=cfg["val_split"],
                          organs=list(cfg["label_sets"][cfg["fold"]]), preset=cfg["eval"]["preset"],
                          input_size=cfg["input_size"], device=t.device, batch_size=cfg["eval"]["batch_size"])
        dice = float(result["mean_dice"])
        if t.run is not None:
            t.run.log_scalar("val_dice", dice, t.step)
            for organ, value in result["per_organ"].items():
                t.run.log_scalar(f"val_dice_{organ}", float(value), t.step)
        improved = math.isfinite(dice) and (t.best_dice is None or dice > t.best_dice)
        per_organ = ", ".join(f"{k} {v:.4f}" for k, v in result["per_organ"].items())
        tqdm.write(f"step {t.step}: validation Dice {dice:.4f} ({per_organ})"
                   + ("  best so far" if improved else ""))
        if improved:
            t.best_dice = dice
            if t.run_dir is not None:
                save_checkpoint(os.path.join(t.run_dir, "best.pth"), t.checkpoint(None))
    t.dist.barrier()
    if t.dist.enabled:  # every rank keeps the same best value (it goes into each rank's checkpoints)
        t.best_dice = t.dist.gather_objects(t.best_dice)[0]


def _finish(t: Trainer, meter: StepMeter, start_step: int, episodes) -> dict:
    """The redraw report, the final weights' digest, the run's summary (Sacred's result and info.json) and
    the 'done' line."""
    cfg, run, info = t.cfg, t.run, {}
    if cfg["episodes"] == "superpixels":
        by_reason = dict(zip(REDRAW_REASONS, torch.as_tensor(t.redraws).expand(len(REDRAW_REASONS)).tolist()))
        t.say(f"episodes redrawn: {sum(by_reason.values())} (no support view kept its superpixel: "
              + ", ".join(f"{reason} {n}" for reason, n in by_reason.items()) + "; docs/usage.md)")
        info = {"episode_redraws": sum(by_reason.values()), "episode_redraw_reasons": by_reason}
    elif episodes.vanished:
        t.say(f"ways redrawn: {int(t.redraws)} (their organ vanished at input_size {cfg['input_size']} in "
              f"every support shot; slices where it vanishes: {episodes.vanish_report()})")
        info = {"episode_redraws": int(t.redraws), "vanished_slices": episodes.vanished,
                "vanished_classes": episodes.dropped}
    digest = weights_digest(t.model)
    print(f"rank {t.dist.rank}: final weights sha256 {digest}", flush=True)
    peak_mb = torch.cuda.max_memory_allocated(t.device) / 2 ** 20 if t.device.type == "cuda" else None
    summary = {"steps": max(start_step, cfg["n_steps"]), "best_dice": t.best_dice, "run_dir": t.run_dir,
               **meter.summary(cfg["batch_size"]), "weights_sha256": digest, "cuda_peak_mb": peak_mb}
    if summary["sec_per_step"] is not None:
        peak = f", peak CUDA {peak_mb:.0f} MB" if peak_mb is not None else ""
        waited = 100 * (summary["data_wait_fraction"] or 0)
        t.say(f"done: {len(meter.step_seconds)} steps, {summary['sec_per_step']:.3f} s/step "
              f"({summary['episodes_per_s']:.2f} episodes/s, data wait {waited:.0f}%{peak}) on {t.device}; "
              f"run folder {t.run_dir}")
    if run is not None:
        run.info.update({**info, **{k: v for k, v in summary.items() if k != "run_dir"}})
    return summary


class StepMeter:
    """Wall time per step (asking the loader for a batch .. `loss.item()`) and the share spent waiting for
    data (above ~10% on a GPU: raise num_workers); work between steps is not timed (`restart`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock, self._tic = clock, clock()
        # per step: the wall time and the time in the loader's next(); the losses since the last window()
        self.step_seconds, self.wait_seconds, self._losses = [], [], []

    def restart(self) -> None:
        self._tic = self._clock()

    def batch_arrived(self) -> None:
        self.wait_seconds.append(self._clock() - self._tic)

    def step_finished(self, loss: float) -> None:
        self.step_seconds.append(self._clock() - self._tic)
        self._losses.append(loss)

    def window(self) -> tuple[float, float, float]:
        """(mean loss, seconds per step, data-wait fraction) of the steps since the last call."""
        losses, self._losses = self._losses, []
        recent = self.step_seconds[-len(losses):]
        waited = sum(self.wait_seconds[-len(losses):]) / max(sum(recent), 1e-12)
        return sum(losses) / len(losses), sum(recent) / len(recent), waited

    def summary(self, batch_size: int) -> dict:
        """sec_per_step, episodes_per_s, data_wait_fraction over steps 2..n (all when one; None when none)."""
        timed = self.step_seconds[1:] or self.step_seconds
        waits = self.wait_seconds[1:] if len(self.step_seconds) > 1 else self.wait_seconds
        sec_per_step = sum(timed) / len(timed) if timed else None
        return {"sec_per_step": sec_per_step,
                "episodes_per_s": batch_size / sec_per_step if sec_per_step else None,
                "data_wait_fraction": min(1.0, sum(waits) / sum(timed)) if timed and sum(timed) > 0 else None}


# ------------------------------------------------------------------------------- run folders
def run_name(config: Mapping) -> str:
    """Folder under path.log_dir that holds this set-up's Sacred runs, e.g. 'lslpn_six_organs_fold0'."""
    if config.get("name"):
        return str(config["name"])
    method = "senet" if config["model"].get("method") == "senet" else \
        "panet" if config["model"]["n_grid"] == 1 else "lslpn"
    if config.get("episodes") == "superpixels":  # no organ is seen: one run serves every fold
        return f"{method}_selfsup"
    return f"{method}_{config['class_setting']}_fold{config['fold']}"


def trajectory_config(config: Mapping, defaults: Mapping) -> dict:
    """{'a.b': value} of the keys that differ from `defaults`, less HASH_EXCLUDED: what identifies a run's
    trained weights."""
    default = flatten(defaults)
    return {key: value for key, value in flatten(config).items()
            if value != default.get(key, ABSENT) and not any(key == excluded or key.startswith(excluded + ".")
                                                            for excluded in HASH_EXCLUDED)}


def config_hash(config: Mapping, defaults: Mapping) -> str:
    """SHA-256 (16 hex digits) of `trajectory_config`."""
    blob = json.dumps(trajectory_config(config, defaults), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trajectory_differences(stored: Mapping, requested: Mapping, defaults: Mapping) -> list[str]:
    """'key: stored -> requested' (dotted keys) for the trajectory keys whose values differ."""
    old, new, default = (trajectory_config(stored, defaults), trajectory_config(requested, defaults),
                         flatten(defaults))
    pairs = {key: [flat.get(key, default.get(key, ABSENT)) for flat in (old, new)]
             for key in sorted({*old, *new})}
    return [f"{key}: {_short(was)} -> {_short(now)}" for key, (was, now) in pairs.items() if was != now]


def iter_runs(log_dir: str | Path, name: str) -> list[Path]:
    """Run folders log_dir/<name>/<id>/, lowest id first (entries that are not numbered folders skipped)."""
    try:
        runs = [p for p in Path(log_dir, name).iterdir() if p.is_dir() and RUN_ID.fullmatch(p.name)]
    except OSError:   # absent or unreadable: no runs there
        return []
    return sorted(runs, key=lambda p: int(p.name))


def latest_run(log_dir: str | Path, name: str, accept: Callable[[Path], bool] = lambda run_dir: True
               ) -> Path | None:
    """The newest run folder of log_dir/name for which `accept(run_dir)` is true."""
    return next((run_dir for run_dir in reversed(iter_runs(log_dir, name)) if accept(run_dir)), None)


def _run_config(run_dir: Path) -> dict | None:
    """The run's config.json when it has a last.pth, else (or when unreadable) None."""
    try:
        return json.loads((run_dir / "config.json").read_text()) if (run_dir / "last.pth").is_file() else None
    except (OSError, ValueError):
        return None


def finished_snapshot(log_dir: str | Path, name: str, n_steps: int, snapshot: str, wanted_hash: str
                      ) -> Path | None:
    """`snapshot` of the newest run of log_dir/name whose last.pth reached n_steps with config_hash
    `wanted_hash`, else None."""
    def finished(run_dir: Path) -> bool:
        if not ((run_dir / "last.pth").is_file() and (run_dir / snapshot).is_file()):
            return False
        state = load_checkpoint(str(run_dir / "last.pth"))
        return state.get("config_hash") == wanted_hash and int(state["step"]) >= n_steps

    found = latest_run(log_dir, name, finished)
    return None if found is None else found / snapshot


def find_resume_checkpoint(log_dir: str, name: str, wanted_hash: str, defaults: Mapping,
                           skip: tuple[str, ...] = ()) -> str | None:
    """last.pth of the latest run under log_dir/name whose config.json hashes to `wanted_hash` (runs
    whose last.pth is in `skip` are passed over)."""
    found = latest_run(log_dir, name, lambda run_dir: str(run_dir / "last.pth") not in skip and (
        config := _run_config(run_dir)) is not None and config_hash(config, defaults) == wanted_hash)
    return None if found is None else str(found / "last.pth")


def unreadable_resume_error(path: str, log_dir: str, name: str, wanted_hash: str,
                            defaults: Mapping) -> UserError:
    """The one-line error for a resume from an unreadable (e.g. truncated) last.pth, with the way out."""
    earlier, step = find_resume_checkpoint(log_dir, name, wanted_hash, defaults, skip=(path,)), None
    with contextlib.suppress(UserError):
        step = None if earlier is None else int(load_checkpoint(earlier)["step"])
    aside = f"move it aside (mv {path} {path}.unreadable) and run again with"
    how = (f"{aside} resume=True: it then continues the earlier run {earlier} at step {step}"
           if step is not None else
           f"no earlier readable last.pth of this config exists; {aside} resume=False to start fresh")
    return UserError(f"resume: {path} is unreadable (truncated or corrupt): {how}")


def config_mismatch(config: Mapping, log_dir: str, name: str, defaults: Mapping) -> str | None:
    """The line for resume=True when no run of this config exists: the newest run with a last.pth under
    log_dir/name, the keys that differ, and that a new run starts; None when there is no such run."""
    found = latest_run(log_dir, name, lambda run_dir: _run_config(run_dir) is not None)
    if found is None:
        return None
    differences = trajectory_differences(_run_config(found), config, defaults)
    shown = "; ".join(differences[:SHOWN_DIFFERENCES])
    if len(differences) > SHOWN_DIFFERENCES:
        shown += f"; and {len(differences) - SHOWN_DIFFERENCES} more"
    return (f"resume: the config differs from the latest run {found} ({shown or 'another config digest'}): "
            "starting a new run at step 0 (set those options back to continue that run)")


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."
