"""`RowAdam`: every row is its own Adam, equal to `torch.optim.Adam` on that row to the bit."""

import pytest
import torch

from nti_lightning.inversion.row_adam import RowAdam


def gradients(steps: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def test_each_row_matches_torch_adam_bit_for_bit():
    """Rows start, stop and restart at different times, with their own rates, over two tensors."""
    rows, steps = 3, 6
    start = [torch.randn(rows, 5, 7, generator=torch.Generator().manual_seed(0)),
             torch.randn(rows, 4, generator=torch.Generator().manual_seed(1))]
    params = [t.clone().requires_grad_() for t in start]
    grads = [gradients(steps, t.shape, seed) for seed, t in enumerate(start, start=10)]
    optimiser = RowAdam(params)
    optimiser.reset([0, 1, 2], [1e-2, 5e-3, 2e-2])
    # row 0 every step; row 1 on even steps; row 2 from step 3 on, restarted fresh with a new rate
    schedule = {0: [0, 1, 2], 1: [0], 2: [0, 1], 3: [0, 2], 4: [0, 1, 2], 5: [0, 2]}
    references = {}
    for row, rate in ((0, 1e-2), (1, 5e-3)):
        tensors = [t[row].clone().requires_grad_() for t in start]
        references[row] = (tensors, torch.optim.Adam(tensors, lr=rate))
    for step in range(steps):
        if step == 3:  # a fresh Adam for row 2 from where it is now
            optimiser.reset([2], 3e-2)
            tensors = [p[2].detach().clone().requires_grad_() for p in params]
            references[2] = (tensors, torch.optim.Adam(tensors, lr=3e-2))
        for param, grad in zip(params, grads):
            param.grad = grad[step].clone()
        before = [p.detach().clone() for p in params]
        optimiser.step(rows=schedule[step])
        optimiser.zero_grad()
        for row in range(rows):
            if row not in schedule[step]:
                assert all(torch.equal(p[row], b[row]) for p, b in zip(params, before))  # untouched
            elif row in references and (row != 2 or step >= 3):
                tensors, adam = references[row]
                for tensor, grad in zip(tensors, grads):
                    tensor.grad = grad[step][row].clone()
                adam.step()
                for tensor, param in zip(tensors, params):
                    assert torch.equal(param[row], tensor.detach()), (step, row)


def test_rows_must_agree():
    with pytest.raises(ValueError, match="share their row count"):
        RowAdam([torch.zeros(2, 3), torch.zeros(3, 3)])
