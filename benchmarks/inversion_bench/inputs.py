"""What the benchmark runs on: the pipeline, the seeded random images, and the baseline loops.

The baseline is the test suite's reference loop (`tests/reference.py`, `tests/reference_xl.py`
for SDXL), with only the device placement of its prompt encoding fixed for a GPU.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from reference import ReferenceNullInversion
from reference_xl import ReferenceNullInversionXL

from nti_lightning.diffusion.ddim import ddim_scheduler
from nti_lightning.models.loading import load_pipeline
from nti_lightning.models.pipelines import is_sdxl
from nti_lightning.models.sd15 import sd15_random_pipeline
from nti_lightning.models.sdxl import sdxl_random_pipeline


def random_image(seed: int, size: int) -> Image.Image:
    """A smooth seeded random colour image, `size` x `size` (a 4x4 noise patch, upsampled).

    Args:
        seed (`int`): seeds the colours.
        size (`int`): side in pixels; the model's resolution, so no resizing happens later.
    """
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def build_pipeline(model: str, device: torch.device, resolution: Optional[int] = None) -> StableDiffusionPipeline:
    """The fp32 pipeline to time, on `device`, with the DDIM scheduler the algorithm uses.

    Args:
        model (`str`): "tiny", "sd15-random", "sdxl-random", or anything `nti_lightning.load_pipeline` takes.
        device (`torch.device`): where the weights go.
        resolution (`int`, *optional*): image side for "sdxl-random" (default its 1024 px).
    """
    if model in ("sd15-random", "sdxl-random"):
        # Initialised where it runs: no 4 (SDXL: 14) GB of random weights made on the host and copied over.
        if model == "sd15-random":
            pipeline = sd15_random_pipeline(seed=0, device=device)
        else:
            pipeline = sdxl_random_pipeline(seed=0, device=device, resolution=resolution)
        pipeline.scheduler = ddim_scheduler(pipeline.scheduler.config)
        return pipeline
    return load_pipeline(model).to(device)


class BaselineLoop(ReferenceNullInversion):
    """The reference loop, unchanged except that the prompt's token ids go to the text encoder's device.

    The reference was written for the CPU, where both are the same; on a GPU the ids would stay
    on the CPU. Encoding the prompt happens once per image, outside the inner loop being timed.
    """

    @torch.no_grad()
    def context(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder

        def encode(text: str) -> torch.Tensor:
            ids = tokenizer(
                [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            return encoder(ids.to(encoder.device))[0]

        return encode(""), encode(prompt)


class BaselineLoopXL(ReferenceNullInversionXL):
    """The SDXL reference loop, unchanged except that prompts are encoded on the text encoders'
    device and the time ids live on the UNet's (the reference was written for the CPU)."""

    def __init__(self, pipe: Any, num_ddim_steps: int = 50, guidance_scale: float = 7.5) -> None:
        super().__init__(pipe, num_ddim_steps=num_ddim_steps, guidance_scale=guidance_scale)
        self.time_ids = self.time_ids.to(pipe.unet.device)

    @torch.no_grad()
    def context(self, prompt: str) -> tuple[torch.Tensor, ...]:
        cond, uncond, cond_pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt, device=self.pipe.text_encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return uncond.float(), cond.float(), uncond_pooled.float(), cond_pooled.float()


def baseline_loop(pipeline: Any, **options: Any) -> ReferenceNullInversion:
    """The reference loop that fits `pipeline`: SD's or SDXL's."""
    return (BaselineLoopXL if is_sdxl(pipeline) else BaselineLoop)(pipeline, **options)
