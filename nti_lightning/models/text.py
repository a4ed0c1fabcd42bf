"""Prompts to UNet conditions, padded to the tokenizer's length as Stable Diffusion does.

`PromptEncoder` is the one place that knows how a pipeline turns text into a `Condition`:

* SD 1.x/2.x: the text encoder's last hidden states `[B, 77, D]`;
* SDXL: the penultimate hidden states of both encoders concatenated `[B, 77, D1 + D2]`, the second
  encoder's projected pooled output `[B, P]`, and the time ids `(R, R, 0, 0, R, R)` of an image at
  the model's resolution R (`StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids`
  with their defaults, written out so that it runs on any device without the pipeline object).

Its `null()` is the pipeline's own unconditional input for "no negative prompt": the encoding of
`""`, or zeros for an SDXL model with `force_zeros_for_empty_prompt` (SDXL base).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from nti_lightning.diffusion.condition import Condition


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """`[len(prompts), 77, D]` fp32 text-encoder outputs (SD 1.x/2.x); `""` gives the null embedding ∅.

    Prompts longer than the tokenizer's 77 tokens are truncated with a warning naming them.
    """
    return text_encoder(_token_ids(tokenizer, prompts, text_encoder.device))[0].float()


def _token_ids(tokenizer: CLIPTokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    max_length = tokenizer.model_max_length
    for prompt in prompts:
        length = len(tokenizer(prompt).input_ids)
        if length > max_length:
            warnings.warn(f"prompt {prompt!r} has {length} tokens; only the first {max_length} are used", stacklevel=3)
    return tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


class PromptEncoder:
    """Encodes prompts into the `Condition` a pipeline's UNet takes.

    Args:
        tokenizers (`Sequence[CLIPTokenizer]`): one tokenizer per text encoder.
        text_encoders (`Sequence[torch.nn.Module]`): the text encoder (SD), or the two (SDXL: the
            second one with a projection, whose pooled output is the `text_embeds`).
        resolution (`int`, *optional*): the model's image side R; SDXL's time ids are
            `(R, R, 0, 0, R, R)`. Required with two encoders.
        zero_null (`bool`, defaults to False): the unconditional input is zeros rather than the
            encoding of `""` (SDXL's `force_zeros_for_empty_prompt`).
    """

    def __init__(
        self,
        tokenizers: Sequence[CLIPTokenizer],
        text_encoders: Sequence[torch.nn.Module],
        resolution: Optional[int] = None,
        zero_null: bool = False,
    ) -> None:
        if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
            raise ValueError("a prompt encoder takes one or two (tokenizer, text encoder) pairs")
        if len(text_encoders) == 2 and resolution is None:
            raise ValueError("an SDXL prompt encoder needs the model's resolution for its time ids")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.resolution = resolution
        self.zero_null = zero_null

    @classmethod
    def of(cls, pipeline: Any, resolution: Optional[int] = None) -> "PromptEncoder":
        """The prompt encoder of a `StableDiffusionPipeline` or `StableDiffusionXLPipeline`.

        Args:
            pipeline: the pipeline (its tokenizers and text encoders are used, not copied).
            resolution (`int`, *optional*): the image side R for SDXL's time ids; defaults to the
                UNet's sample size times the VAE's scale factor (1024 for SDXL base).
        """
        if getattr(pipeline, "text_encoder_2", None) is None:
            return cls([pipeline.tokenizer], [pipeline.text_encoder])
        if resolution is None:
            from nti_lightning.models import vae as vae_codec

            resolution = vae_codec.resolution(pipeline.vae, pipeline.unet.config.sample_size)
        tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
        encoders = [pipeline.text_encoder, pipeline.text_encoder_2]
        if pipeline.text_encoder is None:  # SDXL refiners have the second encoder only
            raise ValueError("SDXL pipelines without their first text encoder (refiners) are not supported")
        zero_null = bool(pipeline.config.get("force_zeros_for_empty_prompt", False))
        return cls(tokenizers, encoders, resolution=resolution, zero_null=zero_null)

    @property
    def has_pooled(self) -> bool:
        """Whether conditions carry a pooled embedding and time ids (SDXL)."""
        return len(self.text_encoders) == 2

    @property
    def tokens(self) -> int:
        return self.tokenizers[0].model_max_length

    @property
    def width(self) -> int:
        """D, the token embeddings' width (SDXL: the two encoders' widths added)."""
        return sum(encoder.config.hidden_size for encoder in self.text_encoders)

    @property
    def pooled_width(self) -> Optional[int]:
        """P, the pooled embedding's width (SDXL), else None."""
        return self.text_encoders[1].config.projection_dim if self.has_pooled else None

    def time_ids(self, batch: int = 1) -> Optional[torch.Tensor]:
        """`[batch, 6]` fp32 SDXL time ids `(R, R, 0, 0, R, R)`, or None for SD."""
        if not self.has_pooled:
            return None
        size = float(self.resolution)
        return torch.tensor([[size, size, 0.0, 0.0, size, size]]).expand(batch, -1).clone()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Condition:
        """The fp32 conditions of `prompts` (on the text encoder's device)."""
        prompts = list(prompts)
        if not self.has_pooled:
            return Condition(encode_prompts(self.tokenizers[0], self.text_encoders[0], prompts))
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            output = encoder(_token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = output[0]  # the last encoder's projected pooled output ("text_embeds")
        embeddings = torch.cat(hidden, dim=-1).float()
        return Condition(embeddings, pooled.float(), self.time_ids(len(prompts)).to(embeddings.device))

    def null(self) -> Condition:
        """The pipeline's own unconditional input, one row: ∅ of docs/ALGORITHM.md."""
        if self.has_pooled and self.zero_null:
            device = self.text_encoders[0].device
            return Condition(
                torch.zeros(1, self.tokens, self.width, device=device),
                torch.zeros(1, self.pooled_width, device=device),
                self.time_ids(1).to(device),
            )
        return self.encode([""])
