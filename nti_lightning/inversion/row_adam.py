"""`RowAdam`: Adam whose rows are independent optimisers, each with its own step count and rate.

The reference gives every timestep of every image a FRESH Adam (state cleared, rate
`lr·(1 - i/100)`). When the images of a batch all sit at the same timestep, one
`torch.optim.Adam` over the batch's embedding, cleared at every timestep, does that. When each
image of a batch is at its own timestep (continuous batching: an image that stopped early starts
its next timestep while the others are still optimising), each row needs its own fresh state,
step count and rate, which `torch.optim.Adam` (one step count per tensor) cannot hold.

`RowAdam` keeps the moments of a `[rows, ...]` tensor and, per row, a step count and a learning
rate; `step` updates the rows of a mask and leaves the others exactly as they are; `reset` gives
rows a fresh state. Every row follows the arithmetic of `torch.optim.Adam` (single-tensor
implementation, no weight decay, no amsgrad) operation for operation, so a row matches
`torch.optim.Adam` on that row alone bit for bit (tested). It is a `torch.optim.Optimizer` (its
moments live in `state`), so Lightning can hand it to the precision plugin (`16-mixed`'s gradient
scaler unscales and checks the gradients before `step`) and move it between devices.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


class RowAdam(torch.optim.Optimizer):
    """Per-row Adam over one or more tensors that share their first (row) dimension.

    Args:
        params (`Sequence[torch.Tensor]`): the tensors optimised, each `[rows, ...]` (e.g. the null
            embedding `[slots, 77, D]` and SDXL's pooled one `[slots, P]`): row r of every tensor
            belongs to optimiser r, as Adam over the pair of a single image's tensors.
        betas (`tuple[float, float]`, defaults to (0.9, 0.999)): Adam's coefficients.
        eps (`float`, defaults to 1e-8): Adam's epsilon.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        params = list(params)
        rows = {p.shape[0] for p in params}
        if len(rows) != 1:
            raise ValueError(f"RowAdam's tensors must share their row count, got {sorted(rows)}")
        # `lr` is per row (`lrs`); the group's is only what tools that read param_groups see.
        super().__init__(params, {"lr": 0.0, "betas": betas, "eps": eps})
        self.rows = rows.pop()
        self.betas = betas
        self.eps = eps
        for param in self.params:
            self.state[param] = {
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        self.steps = [0] * self.rows
        self.lrs = [0.0] * self.rows

    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @torch.no_grad()
    def reset(self, rows: Sequence[int], lr: float | Sequence[float]) -> None:
        """Fresh optimisers for `rows` (moments and step count zeroed) with learning rate `lr`
        (one for all, or one per row)."""
        rates = [float(lr)] * len(rows) if isinstance(lr, (int, float)) else [float(r) for r in lr]
        for row, rate in zip(rows, rates):
            for param in self.params:
                self.state[param]["exp_avg"][row].zero_()
                self.state[param]["exp_avg_sq"][row].zero_()
            self.steps[row] = 0
            self.lrs[row] = rate

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, rows: Sequence[int] = ()) -> Optional[float]:  # type: ignore[override]
        """One Adam update of `rows` from the tensors' `.grad`; every other row is left untouched.

        Args:
            closure (`Callable`, *optional*): re-evaluates the loss (the `torch.optim` protocol;
                Lightning passes one in manual optimisation).
            rows (`Sequence[int]`): the rows (slots) to update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        beta1, beta2 = self.betas
        for row in rows:
            self.steps[row] += 1
            step = self.steps[row]
            # As torch.optim.adam._single_tensor_adam: Python-float bias corrections.
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lrs[row] / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            for param in self.params:
                exp_avg, exp_avg_sq = self.state[param]["exp_avg"], self.state[param]["exp_avg_sq"]
                grad = param.grad[row] if param.grad is not None else torch.zeros_like(param[row])
                exp_avg[row].lerp_(grad, 1 - beta1)
                exp_avg_sq[row].mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                denom = (exp_avg_sq[row].sqrt() / bias_correction2_sqrt).add_(self.eps)
                param[row].addcdiv_(exp_avg[row], denom, value=-step_size)
        return loss
