"""Predictions of a trained continual model on cached examples, per inference mode.

Every function returns predicted global class ids ``[N]`` (and, where a router decides, the task
whose expert each sample was routed to, ``[N]``):

* :func:`predict_shared`: one routing for the whole batch (``single`` expert or the O-LoRA ``sum``);
  task-aware = argmax over the evaluated task's classes, task-agnostic = over all seen classes.
* :func:`predict_routed`: a sample-level router (task id or retrieval) picks each sample's expert;
  the prediction is the argmax over that expert's task's classes.
* :func:`expert_logits`: every seen expert runs alone through its own head (one forward each);
  the confidence and statistics routers of :mod:`moe_lora.continual.strategies` decide from it.
* :func:`predict_gated`: MoLE gates mix the experts in every layer; argmax over seen classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from moe_lora.continual.module import MoELoRAModule
from moe_lora.continual.prepared import Examples, loader
from moe_lora.core.routing import RouterInput, Routing

__all__ = [
    "class_mask",
    "expert_logits",
    "masked_argmax",
    "predict_gated",
    "predict_routed",
    "predict_shared",
]


def class_mask(n_classes: int, ids: list[int]) -> Tensor:
    """Bool ``[n_classes]``, True at ``ids``."""
    m = torch.zeros(n_classes, dtype=torch.bool)
    m[torch.tensor(ids, dtype=torch.long)] = True
    return m


def masked_argmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """Argmax of ``logits`` [N, C] over the classes where ``allowed`` ([C] or [N, C]) is True."""
    return logits.masked_fill(~allowed.to(logits.device), float("-inf")).argmax(-1)


def _batches(module: MoELoRAModule, ex: Examples, bs: int) -> Iterator[dict[str, Tensor]]:
    """Collated batches of ``ex`` in order, on the module's device."""
    assert module.backbone is not None
    device = module.device
    for batch in loader(ex, module.backbone, bs):
        yield {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def predict_shared(
    module: MoELoRAModule, ex: Examples, task_classes: Tensor, seen_classes: Tensor, mode: str,
    bs: int = 256,
) -> tuple[Tensor, Tensor]:
    """(task-aware, task-agnostic) predictions ``[N]`` under routing ``mode`` (single / sum)."""
    aware, agnostic = [], []
    for batch in _batches(module, ex, bs):
        logits = module.logits(batch, module.routing(len(batch["labels"]), mode))
        aware.append(masked_argmax(logits, task_classes))
        agnostic.append(masked_argmax(logits, seen_classes))
    return torch.cat(aware), torch.cat(agnostic)


@torch.no_grad()
def predict_routed(
    module: MoELoRAModule, ex: Examples, route: Callable[[dict[str, Tensor], list[str]], Routing],
    expert_classes: Tensor, bs: int = 256,
) -> tuple[Tensor, Tensor]:
    """Predictions and routed experts ``[N]`` for a sample-level router.

    Args:
        route: ``(batch, keys) -> Routing`` with one expert per sample (``Routing.per_sample``).
        expert_classes: bool ``[E, n_classes]``: the classes of each expert's task.
    """
    preds, routed = [], []
    start = 0
    for batch in _batches(module, ex, bs):
        n = len(batch["labels"])
        routing = route(batch, ex.keys[start : start + n])
        start += n
        assert routing.indices is not None
        experts = routing.indices[:, 0]
        logits = module.logits(batch, routing)
        preds.append(masked_argmax(logits, expert_classes[experts]))
        routed.append(experts)
    return torch.cat(preds), torch.cat(routed)


@torch.no_grad()
def predict_gated(
    module: MoELoRAModule, ex: Examples, router: object, seen_classes: Tensor, bs: int = 256
) -> tuple[Tensor, Tensor]:
    """Predictions ``[N]`` under MoLE gates and each sample's mean gate weights ``[N, E]``.

    ``router``: a :class:`moe_lora.routers.MoLERouter` attached to the module's bank.
    """
    preds, routed = [], []
    for batch in _batches(module, ex, bs):
        mask = batch.get("attention_mask")
        routing = router.routing(RouterInput(attention_mask=mask))  # type: ignore[attr-defined]
        logits = module.logits(batch, routing)
        module.bank.pop_aux_loss()
        preds.append(masked_argmax(logits, seen_classes))
        routed.append(sample_gate_probs(router, mask, len(batch["labels"])))
    return torch.cat(preds), torch.cat(routed)


def sample_gate_probs(router: object, mask: Tensor | None, batch_size: int) -> Tensor:
    """Gate probabilities per sample ``[B, E]``: mean over gated layers and real tokens."""
    probs = [g.last_probs for g in router.gates.values()  # type: ignore[attr-defined]
             if getattr(g, "last_probs", None) is not None]
    stacked = torch.stack(probs).mean(0)  # [N, E]
    per = stacked.reshape(batch_size, -1, stacked.shape[-1])  # [B, T, E]
    if mask is None:
        return per.mean(1)
    m = mask.to(per.dtype).unsqueeze(-1)
    return (per * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def expert_logits(module: MoELoRAModule, ex: Examples, expert: int, class_ids: list[int],
                  bs: int = 256) -> Tensor:
    """Expert ``expert`` alone (``Routing.single``) through the heads on ``ex``, restricted to
    its task's classes ``class_ids``: ``[N, len(class_ids)]`` on the CPU."""
    out = [module.logits(batch, Routing.single(expert))[:, class_ids].cpu()
           for batch in _batches(module, ex, bs)]
    return torch.cat(out) if out else torch.zeros(0, len(class_ids))
