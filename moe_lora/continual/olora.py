r"""O-LoRA: orthogonal subspaces for continual LoRA (Wang et al. 2023, arXiv 2310.14152).

While learning task ``t`` with a new expert ``(A_t, B_t)``, O-LoRA keeps the new update's input
subspace orthogonal to the earlier experts' and penalises the new expert's size::

    L_olora = lambda1 * sum_layers sum_{i,j} | (A_prev A_t^T)_{ij} |  +  lambda2 * || theta_t ||_2

    A_prev = [A_0; A_1; ...; A_{t-1}]   (the earlier experts' A matrices stacked:  [sum r_i, in])
    A_t                                 (the new expert's A:                        [r_t, in])

In each layer the overlap is ONE matmul of the stacked earlier factors with the new one (the bank
keeps frozen experts as a padded stack ``[E, R, in]``; padding rows are zero and add nothing).
At inference O-LoRA sums every expert (``Routing.dense`` with all-ones weights), as the paper does.
Defaults are the paper's: ``lambda1 = 0.5``, ``lambda2 = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lora.core.bank import ExpertBank

__all__ = ["olora_loss", "orthogonality", "l2_norm"]


def orthogonality(bank: ExpertBank, new: int, previous: list[int]) -> Tensor:
    """``sum_layers sum |A_prev A_new^T|`` for expert index ``new`` against ``previous`` (scalar).

    Zero (with a gradient path) when ``previous`` is empty.
    """
    device = next(iter(bank.layers.values())).base.weight.device
    if not previous:
        return torch.zeros((), device=device)
    prev_ids = torch.tensor(previous, dtype=torch.long, device=device)
    total = torch.zeros((), device=device)
    for layer in bank.layers.values():
        a_prev, _ = layer.stacked(prev_ids)  # [U, R, in], frozen: cached stack
        a_new = layer.experts[new].lora_A  # [r, in]
        overlap = a_prev.reshape(-1, layer.in_features) @ a_new.t()  # [U*R, r], one matmul
        total = total + overlap.abs().sum()
    return total


def l2_norm(bank: ExpertBank, new: int) -> Tensor:
    """``||theta_new||_2``: the L2 norm of all of expert ``new``'s factors together (scalar)."""
    sq = [f.pow(2).sum() for layer in bank.layers.values()
          for f in (layer.experts[new].lora_A, layer.experts[new].lora_B)]
    return torch.stack(sq).sum().sqrt()


def olora_loss(
    bank: ExpertBank, new: int, previous: list[int], lambda1: float = 0.5, lambda2: float = 0.0
) -> Tensor:
    """``lambda1 * orthogonality + lambda2 * l2_norm`` (see the module docstring)."""
    loss = lambda1 * orthogonality(bank, new, previous)
    if lambda2:
        loss = loss + lambda2 * l2_norm(bank, new)
    return loss
