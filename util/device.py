"""Devices, mixed precision (`amp_dtype`: AMP_SETTINGS), seeding, RNG state (Python, numpy, torch CPU and
CUDA: a resumed run continues the same random streams) and torch.distributed set-up (`Distributed` reads
torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on CUDA; under torchrun the process group
starts even for one process, so one GPU exercises nccl and DDP).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from util.errors import UserError

DEVICES = ("auto", "cpu", "cuda")   # the device setting: CUDA when present (auto), or that device

# The amp setting: False = full precision; True = the fast path where the hardware has it: CUDA bf16 (else
# fp16), CPU bf16 only with native bf16 instructions (else full precision, one logged line); 'bf16' / 'fp16'
# = that dtype on any device (an emulated CPU bf16 says so once). fp16 gets a GradScaler.
AMP_SETTINGS = (False, True, "bf16", "fp16")
AMP_FIX = ("use False, True (bf16 where the hardware has it, else fp16 on a GPU, full precision on a CPU), "
           "'bf16' or 'fp16' (these two on CPU too)")
log = logging.getLogger("lslpn")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo flags of native bf16 arithmetic (x86)


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """torch.device for 'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'; a torch.device as is."""
    if isinstance(name, torch.device):
        return name
    if name not in DEVICES:
        raise UserError(f"device '{name}' is unknown: use 'auto', 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available: use device=cpu or device=auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """This CPU computes bf16 natively (AVX-512 BF16 or AMX: oneDNN's fast path), per /proc/cpuinfo;
    False where unreadable (not Linux x86)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


@functools.lru_cache(maxsize=None)
def say_once(message: str) -> None:
    """Log `message` (a fallback or slow path) once per process."""
    log.warning(message)


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype of the `amp` setting on `device`; None means full precision."""
    if amp is True:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if cpu_has_native_bf16():
            return torch.bfloat16
        say_once("amp=True: this CPU has no native bf16 (flags avx512_bf16 / amx_bf16): full precision")
        return None
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("amp='bf16': this GPU does not support bf16: use amp='fp16' or amp=True")
        if device.type == "cpu" and not cpu_has_native_bf16():
            say_once("amp='bf16': this CPU has no native bf16 (flags avx512_bf16 / amx_bf16): emulated, "
                     "slower than full precision (amp=True picks bf16 only where it is fast)")
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    return None


def autocast(device: torch.device, amp: bool | str):
    """Autocast context for the forward pass (a null context when AMP does not apply)."""
    dtype = amp_dtype(device, amp)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, amp: bool | str) -> torch.amp.GradScaler:
    """The device's GradScaler, enabled for fp16 autocast only (bf16 and fp32 need none; disabled, it passes
    the loss and the optimiser step through unchanged)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (all CUDA devices too)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Snapshot of every global generator (for checkpoints)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a `get_rng_state` snapshot (CUDA states only when this machine has as many GPUs)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False       # started by torchrun (WORLD_SIZE set): a process group even for 1 rank

    @property
    def backend(self) -> str | None:
        """'nccl' or 'gloo' once the process group is up, else None."""
        return dist.get_backend() if self.enabled and dist.is_initialized() else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order (on all ranks)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank, before saving and at the end
        (each rank's forward updates its own; DDP re-broadcasts them only at the next forward)."""
        if self.enabled:
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def distributed_from_env() -> Distributed:
    """Rank, world size and local rank from torchrun's environment variables."""
    try:
        return Distributed(rank=int(os.environ.get("RANK", 0)),
                           world_size=int(os.environ.get("WORLD_SIZE", 1)),
                           local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                           enabled="WORLD_SIZE" in os.environ)
    except ValueError as error:
        raise UserError(f"torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK) is malformed: {error}")


def init_distributed(ctx: Distributed, device: torch.device) -> None:
    """Join the process group: nccl for CUDA, gloo for CPU (no-op outside torchrun)."""
    if not ctx.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            rank=ctx.rank, world_size=ctx.world_size)
