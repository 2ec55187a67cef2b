"""The compute device: which one, how its ops run (autocast, threads, batch sizes).

The API's inference engine imports this module instead of the worker loop.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(setting: str) -> torch.device:
    """`auto`: the first GPU if any, else CPU; `cuda:N` must exist, or the worker refuses to start."""
    if setting == "auto":
        return pick_device()
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise SystemExit(f"device {setting} is not available on this machine "
                             f"({torch.cuda.device_count()} GPU(s) visible)")
        # a bare "cuda" means the current GPU; torch.cuda.set_device refuses a device without an index
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


@contextmanager
def single_thread(device: torch.device):
    """Run tiny CPU ops (a head on cached features) on one thread. With more, every op waits on a
    thread barrier: on a busy 2-core machine a linear probe measured 14x slower on 2 threads."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inference_batch_size(device: torch.device) -> int:
    # Measured on a 2-core CPU: Lite0 runs ~65 img/s at batch 4-8 but ~38 img/s at 32 (cache misses).
    return 256 if device.type == "cuda" else 8


def autocast(device: torch.device):
    # bf16 on GPUs; CPUs stay in fp32 so the same seed gives the same result.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
