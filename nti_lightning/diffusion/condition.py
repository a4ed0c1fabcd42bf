"""`Condition`: everything the UNet is conditioned on besides the latent and the timestep.

Stable Diffusion 1.x/2.x condition on token embeddings alone. SDXL adds a pooled text embedding
and six micro-conditioning time ids (`added_cond_kwargs`). One type carries all three so that the
core (pivot, null-text objective, guided step, sampling) is written once for every model: the
SD-only fields are simply `None`.

The null condition φ of Null-text Inversion is a `Condition` too: its token embeddings (and, for
SDXL, its pooled embedding) are what the optimisation tunes; the time ids are never tuned.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class Condition:
    """A batch of UNet conditions.

    Args:
        embeddings (`torch.Tensor`): `[B, 77, D]` token embeddings (`encoder_hidden_states`).
        pooled (`torch.Tensor`, *optional*): `[B, P]` pooled text embedding (SDXL's
            `text_embeds`); `None` for SD 1.x/2.x.
        time_ids (`torch.Tensor`, *optional*): `[B, 6]` SDXL micro-conditioning
            `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`; `None` for SD 1.x/2.x.
    """

    embeddings: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if (self.pooled is None) != (self.time_ids is None):
            raise ValueError("an SDXL condition needs both a pooled embedding and time ids")

    @property
    def batch(self) -> int:
        return self.embeddings.shape[0]

    @property
    def has_pooled(self) -> bool:
        """Whether this is an SDXL-style condition (pooled embedding and time ids)."""
        return self.pooled is not None

    def unet_kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        """The keyword arguments of `UNet2DConditionModel.forward` for this condition, in `dtype`."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeddings.to(dtype)}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}
        return kwargs

    def tunable(self) -> tuple[torch.Tensor, ...]:
        """The tensors Null-text Inversion optimises: the token embeddings, and the pooled one if any."""
        return (self.embeddings,) if self.pooled is None else (self.embeddings, self.pooled)

    def with_tunable(self, embeddings: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> "Condition":
        """This condition with other token (and pooled) embeddings; the time ids are kept."""
        if (pooled is None) != (self.pooled is None):
            raise ValueError("the pooled embedding must be given exactly when the condition has one")
        return replace(self, embeddings=embeddings, pooled=pooled)

    def expand(self, batch: int) -> "Condition":
        """Broadcasts a batch of one to `batch` rows (no copy); other batches must already match."""
        return Condition(
            self.embeddings.expand(batch, *self.embeddings.shape[1:]),
            None if self.pooled is None else self.pooled.expand(batch, -1),
            None if self.time_ids is None else self.time_ids.expand(batch, -1),
        )

    def rows(self, index: Any) -> "Condition":
        """The rows `index` (an int, slice, mask or index tensor) of every tensor; an int keeps the batch dim."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Condition(
            self.embeddings[index],
            None if self.pooled is None else self.pooled[index],
            None if self.time_ids is None else self.time_ids[index],
        )

    def to(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> "Condition":
        return Condition(*(None if t is None else t.to(device=device, dtype=dtype) for t in self._tensors()))

    def detach(self) -> "Condition":
        return Condition(*(None if t is None else t.detach() for t in self._tensors()))

    def clone(self) -> "Condition":
        return Condition(*(None if t is None else t.detach().clone() for t in self._tensors()))

    def _tensors(self) -> tuple[Optional[torch.Tensor], ...]:
        return (self.embeddings, self.pooled, self.time_ids)

    @staticmethod
    def cat(conditions: Sequence["Condition"]) -> "Condition":
        """Concatenates conditions along the batch (e.g. `[uncond, cond]` for classifier-free guidance)."""
        first = conditions[0]
        if any(c.has_pooled != first.has_pooled for c in conditions):
            raise ValueError("cannot concatenate SD and SDXL conditions")
        return Condition(
            torch.cat([c.embeddings for c in conditions]),
            None if first.pooled is None else torch.cat([c.pooled for c in conditions]),
            None if first.time_ids is None else torch.cat([c.time_ids for c in conditions]),
        )
