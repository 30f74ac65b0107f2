"""Which device to run on: the one choice training and inference share."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only to pick a device: every command's error handling imports DeviceError
    import torch


class DeviceError(Exception):
    """The requested device does not exist here."""


def pick_device(spec: str = "auto") -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: no CUDA GPU is available on this machine; use --device cpu (or auto, "
                              f"which picks the CPU here)")
        device = torch.device(spec if ":" in spec else "cuda:0")
        if device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise DeviceError(f"--device {spec}: only {n} CUDA device(s) here: give cuda:0 to cuda:{n - 1}")
        return device
    raise DeviceError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
