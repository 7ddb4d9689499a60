"""12. GPU-sized shapes (issue 12, item 5): SmolLM2-135M, prefill 256 x 128 and decode 256 x 1, with
8 / 64 / 512 distinct experts routed per sample; tokens/s and peak memory against the base model
(no experts) and against PEFT ``adapter_names``.

At full size the case runs only on CUDA (one prefill is about 9 TFLOP: minutes per round on a small
CPU); on the CPU it reports itself pending, and ``--quick`` runs it at toy shapes so that the code
path is tested everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks.fixtures import (
    clone_model,
    forward_fn,
    load_model,
    make_bank,
    peft_twin,
    token_batch,
)
from benchmarks.harness import Row, Settings, check_close, peak_memory, time_interleaved
from moe_lora import Routing

__all__ = ["case_scale"]

PEFT_MAX_EXPERTS = 64
"""PEFT twins are built up to this many adapters (adding 512 PEFT adapters takes minutes)."""


def _shapes(s: Settings) -> tuple[int, int, list[int]]:
    """(batch, prefill length, expert counts)."""
    if s.quick:
        return 4, 8, [2, 4]
    return 256, 128, [8, 64, 512]


def case_scale(s: Settings) -> list[Row]:
    """12. Per-sample experts at GPU-sized shapes on SmolLM2-135M: tokens/s and peak memory."""
    what = "scale: SmolLM2-135M 256x128 prefill / 256x1 decode, 8/64/512 experts"
    if not s.quick and not s.device.startswith("cuda"):
        return [Row.pending("12", what, None, "GPU-sized: runs with --device cuda (or --quick)")]
    b, t_len, counts = _shapes(s)
    model = load_model("smollm2-135m", s)
    peft_base = clone_model(model)
    bank = make_bank(model, "smollm2-135m", max(counts))
    prefill = token_batch(model, b, t_len, s)
    decode = token_batch(model, b, 1, s, seed=1)
    rows: list[Row] = []
    peft = None
    peft_n = [n for n in counts if n <= PEFT_MAX_EXPERTS]
    if peft_n:
        peft = peft_twin(peft_base, "smollm2-135m", bank, bank.names[: max(peft_n)])
    for phase, batch in (("prefill", prefill), ("decode", decode)):
        tokens = batch["input_ids"].numel()
        fns: dict[str, Callable[[], Tensor]] = {"base": forward_fn(bank, batch, Routing.base())}
        checks: dict[int, str] = {}
        for n in counts:
            idx = (torch.arange(b) % n).to(s.device)
            fns[f"N={n}"] = forward_fn(bank, batch, Routing.per_sample(idx))
            if peft is not None and n in peft_n:
                names = [bank.names[i] for i in idx.tolist()]
                fns[f"peft N={n}"] = forward_fn(peft, batch, adapter_names=names)
                checks[n] = check_close(f"{phase} N={n} vs PEFT adapter_names", fns[f"N={n}"](),
                                        fns[f"peft N={n}"](), s)
            else:
                checks[n] = "timing only (no PEFT twin at this size)"
        t = time_interleaved(fns, s)
        memory = {}
        for key, fn in fns.items():
            with peak_memory(s) as mem:
                fn()
            memory[key] = round(mem["peak_mib"], 1)
        tps = {k: round(tokens / v.min_s) for k, v in t.items()}
        for n in counts:
            key = f"N={n}"
            rows.append(Row.ratio("12", f"{phase} {b}x{batch['input_ids'].shape[1]}, {key} "
                                  "per-sample experts vs base model", (key, t[key]),
                                  ("base", t["base"]), None, checks[n], tokens_per_s=tps,
                                  peak_mib=memory))
            if f"peft {key}" in t:
                rows.append(Row.ratio("12", f"{phase} {b}x{batch['input_ids'].shape[1]}, {key} "
                                      "vs PEFT adapter_names", (key, t[key]),
                                      (f"peft {key}", t[f"peft {key}"]), None, checks[n],
                                      tokens_per_s=tps, peak_mib=memory))
    return rows
