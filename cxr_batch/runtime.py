"""How the model runs on its device: the precision and layout policy, and decode workers.

channels_last always (DenseNet's convolutions run faster in it on CPU and GPU). Precision
"auto": on CUDA, float16 autocast (bfloat16 where the card prefers it); on CPU, bfloat16
autocast only where the CPU has native bfloat16 units (AVX-512 BF16 or AMX), since
emulated bfloat16 is slower than float32; float32 otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .device import DeviceError, available_cores, pick_device

log = logging.getLogger("cxr_batch")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunPolicy:
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16"

    @property
    def autocast_dtype(self):
        return _DTYPES[self.precision]

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return f"{self.device} ({name}), {self.precision}, channels_last"
        return f"cpu ({torch.get_num_threads()} threads), {self.precision}, channels_last"


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch without the probes: assume not
        return False


def pick_precision(device: torch.device, requested: str = "auto") -> str:
    if requested not in PRECISIONS:
        raise DeviceError(f"--precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise DeviceError("--precision fp16 is for CUDA; on CPU use bf16 or fp32")
        return requested
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def make_policy(device: str = "auto", precision: str = "auto") -> RunPolicy:
    dev = pick_device(device)
    return RunPolicy(dev, pick_precision(dev, precision))


def default_workers(device: torch.device | None = None) -> int:
    """Reading processes (cxr_batch.sandbox: decoding under a memory ceiling).

    On a GPU the model is fast and decoding is the limit: every core but one reads. On a CPU
    the model's threads need the cores and one reader keeps ahead of the model on small
    machines (a 512-px PNG reads in a few milliseconds, the model takes tens); larger machines
    give a quarter of their cores to readers.
    """
    cores = available_cores()
    if device is not None and device.type == "cuda":
        return max(1, min(32, cores - 1))
    return max(1, min(8, cores // 4))
