"""Training cases: a LoRA step vs a forward and full fine-tuning (5), ours vs PEFT (11), O-LoRA (6).

A step is ``zero_grad -> forward -> mean(h^2) -> backward -> AdamW.step`` on the model without an
LM head, in eval mode (no dropout, so that both sides compute the same numbers).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor, nn

from benchmarks.fixtures import (
    clone_model,
    hidden_loss,
    load_model,
    make_bank,
    peft_twin,
    token_batch,
)
from benchmarks.harness import Goal, Row, Settings, check_close, peak_memory, time_interleaved
from moe_lora import ExpertBank, ExpertConfig, Routing

__all__ = ["case_training", "case_olora"]


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Tensor]
          ) -> Callable[[], Tensor]:
    def run() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = hidden_loss(model(**batch))
        loss.backward()
        opt.step()
        return loss.detach()

    return run


def _state_mib(opt: torch.optim.Optimizer) -> float:
    """Trainable parameters plus optimiser state, in MiB."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            total += p.numel() * p.element_size()
            for v in opt.state.get(p, {}).values():
                if isinstance(v, Tensor):
                    total += v.numel() * v.element_size()
    return total / 2**20


def _check_twins(bank_model: nn.Module, bank_layer: nn.Module, peft: nn.Module, path: str,
                 batch: dict[str, Tensor], s: Settings) -> str:
    """Same loss and same gradient on the first target's B factor, ours vs PEFT."""
    ours, theirs = hidden_loss(bank_model(**batch)), hidden_loss(peft(**batch))
    ours.backward()
    theirs.backward()
    g_ours = bank_layer.experts[0].lora_B.grad
    g_peft = dict(peft.base_model.model.named_modules())[path].lora_B["e0"].weight.grad
    check_close("loss ours vs PEFT", ours, theirs, s)
    check = check_close(f"grad of {path}.lora_B ours vs PEFT", g_ours, g_peft, s)
    bank_model.zero_grad(set_to_none=True)
    peft.zero_grad(set_to_none=True)
    return "loss and " + check


def _training_rows(name: str, b: int, t_len: int, s: Settings) -> list[Row]:
    base = load_model(name, s)
    peft_model, full = clone_model(base), clone_model(base)
    bank = make_bank(base, name, 1, trainable=True)
    bank.set_routing(Routing.single(0))
    peft = peft_twin(peft_model, name, bank, ["e0"], trainable=True)
    full.requires_grad_(True)
    batch = token_batch(base, b, t_len, s)
    path = next(iter(bank.layers))
    check = _check_twins(bank.model, bank.layers[path], peft, path, batch, s)
    opts = {
        "ours": torch.optim.AdamW(bank.trainable_parameters(), lr=1e-4),
        "peft": torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4),
        "full": torch.optim.AdamW(full.parameters(), lr=1e-4),
    }
    fns: dict[str, Callable[[], Tensor]] = {
        "ours": _step(bank.model, opts["ours"], batch),
        "peft": _step(peft, opts["peft"], batch),
        "full": _step(full, opts["full"], batch),
    }

    def forward() -> Tensor:
        with torch.no_grad():
            return bank.model(**batch).last_hidden_state

    fns["no-grad fwd"] = forward
    t = time_interleaved(fns, s)
    memory: dict[str, dict[str, float]] = {}
    for key, fn in fns.items():
        with peak_memory(s) as mem:
            fn()
        memory[key] = {"peak_mib": round(mem["peak_mib"], 1)}
        if key in opts:
            memory[key]["params_and_optimizer_mib"] = round(_state_mib(opts[key]), 1)
    tokens = b * t_len
    tps = {k: tokens / v.min_s for k, v in t.items()}
    shape = f"{name} {b}x{t_len}"
    return [
        Row.ratio("5", f"{shape}: LoRA step vs no-grad forward", ("ours", t["ours"]),
                  ("no-grad fwd", t["no-grad fwd"]), Goal("<=", 2.1),
                  "timing only (a step and a forward differ); twins: " + check,
                  memory=memory, tokens_per_s=tps,
                  peft_vs_forward=t["peft"].min_s / t["no-grad fwd"].min_s),
        Row.ratio("5", f"{shape}: LoRA step vs full fine-tuning step", ("ours", t["ours"]),
                  ("full", t["full"]), Goal("<=", 0.85), "timing only", memory=memory),
        Row.ratio("11", f"{shape}: training tokens/s ours vs PEFT", ("ours", t["ours"]),
                  ("peft", t["peft"]), Goal(">=", 1.0), check, invert=True, memory=memory,
                  tokens_per_s=tps),
    ]


def case_training(s: Settings) -> list[Row]:
    """5 and 11 on MiniLM (32x64) and SmolLM2-135M (4x64)."""
    shapes = [("minilm", 32, 64), ("smollm2-135m", 4, 64)]
    if s.quick:
        shapes = [("minilm", 2, 16)]
    return [row for name, b, t_len in shapes for row in _training_rows(name, b, t_len, s)]


def case_olora(s: Settings) -> list[Row]:
    """6. O-LoRA penalty with 100 and 1,000 earlier experts as a share of a training step."""
    goals = {100: Goal("<=", 5.0), 1000: Goal("<=", 25.0)}
    try:
        olora = importlib.import_module("moe_lora.continual.olora")
    except ImportError:
        return [Row.pending("6", f"O-LoRA penalty, {n} earlier experts, % of a step", g,
                            "moe_lora/olora.py not there yet") for n, g in goals.items()]
    return _olora_rows(olora, goals, s)


def _olora_rows(olora: ModuleType, goals: dict[int, Goal], s: Settings) -> list[Row]:
    b, t_len = (16, 64) if not s.quick else (2, 8)
    rows = []
    for n_prev, goal in goals.items():
        n = n_prev if not s.quick else n_prev // 50
        bank = make_bank(load_model("minilm", s), "minilm", n)
        new = bank.add_expert("new", ExpertConfig(rank=8, alpha=16, init="random"), trainable=True)
        bank.set_routing(Routing.single(new))
        previous = list(range(n))
        batch = token_batch(bank.model, b, t_len, s)
        step = _step(bank.model, torch.optim.AdamW(bank.trainable_parameters(), lr=1e-4), batch)

        def penalty(previous: list[int] = previous, bank: ExpertBank = bank, new: int = new
                    ) -> Tensor:
            loss = olora.olora_loss(bank, new, previous)
            loss.backward()
            return loss.detach()

        with torch.no_grad():
            ref = sum(
                (layer.experts[p].lora_A @ layer.experts[new].lora_A.t()).abs().sum()
                for layer in bank.layers.values() for p in previous
            )
        check = check_close("olora_loss vs 0.5 * explicit per-expert sum |A_p A_new^T|",
                            penalty(), 0.5 * torch.as_tensor(ref), s)
        t = time_interleaved({"penalty": penalty, "step": step}, s)
        rows.append(Row.measured(
            "6", f"O-LoRA penalty (fwd+bwd), {n} earlier experts, % of a {b}x{t_len} step",
            100 * t["penalty"].min_s / t["step"].min_s, "%", goal, check, a_name="penalty",
            b_name="step", a=t["penalty"], b=t["step"]))
    return rows
