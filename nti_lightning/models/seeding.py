"""`seeded_build`: building seeded random networks without touching the caller's random stream."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Union

import torch


@contextmanager
def seeded_build(seed: int, device: Optional[Union[str, torch.device]] = None) -> Iterator[None]:
    """Seeds every generator for the networks built inside the block, then restores the caller's.

    Args:
        seed (`int`): `torch.manual_seed` value (it seeds the CPU and every CUDA generator, so the
            initialisation is seeded wherever it runs; CPU and CUDA streams differ, so the same
            seed gives other weights on another kind of device).
        device (`str` or `torch.device`, *optional*): create the parameters there directly (a
            `torch.device` context: no host copy to build and move; "meta" for shapes only).
            Defaults to the current default device.
    """
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        with torch.device(device) if device is not None else nullcontext():
            yield
    finally:
        # Building a model must not change the caller's random stream.
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
