"""Inference cases: the LoRA layer (1), merging (2), mixed batches (3, 10), decode (4), growth (9).

All forwards run under ``torch.no_grad()`` on the embedded MiniLM (targets query/value, rank 8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.fixtures import (
    clone_model,
    expert_reference,
    forward_fn,
    load_model,
    make_bank,
    peft_twin,
    token_batch,
)
from benchmarks.harness import Goal, Row, Settings, check_close, time_interleaved
from moe_lora import ExpertBank, ExpertConfig, Routing

__all__ = ["case_layer", "case_merged", "case_mixed", "case_decode", "case_growth"]


class _Holder(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)


def case_layer(s: Settings) -> list[Row]:
    """1. One LoRA layer (r=8, d=768, 1024 tokens) vs the bare base Linear."""
    d, shape = (768, (8, 128)) if not s.quick else (256, (2, 32))
    holder = _Holder(d).to(s.device, s.dtype)
    bank = ExpertBank(holder, targets=["proj"])
    bank.add_expert("e0", ExpertConfig(rank=8, alpha=16, init="random"), trainable=False)
    layer = bank.layers["proj"]
    x = torch.randn(*shape, d, device=s.device, dtype=s.dtype)
    f = layer.experts[0]

    def lora() -> Tensor:
        with torch.no_grad(), bank.use(Routing.single(0)):
            return layer(x)

    def base() -> Tensor:
        with torch.no_grad():
            return layer.base(x)

    with torch.no_grad():
        ref = layer.base(x) + f.scale * (x @ f.lora_A.t()) @ f.lora_B.t()
    check = check_close("LoRA layer vs W x + b + s B A x", lora(), ref, s)
    t = time_interleaved({"lora": lora, "base": base}, s)
    return [Row.ratio("1", f"LoRA layer d={d}, {shape[0] * shape[1]} tok vs base Linear",
                      ("lora", t["lora"]), ("base", t["base"]), Goal("<=", 1.25), check)]


def case_merged(s: Settings) -> list[Row]:
    """2. One merged expert vs the base model (the LoRA wrappers' cost when merged)."""
    b, t_len = (16, 32) if not s.quick else (2, 8)
    model = load_model("minilm", s)
    plain = clone_model(model)
    bank = make_bank(model, "minilm", 1)
    batch = token_batch(model, b, t_len, s)
    unmerged = forward_fn(bank, batch, Routing.single(0))()
    bank.merge("e0")
    with torch.no_grad():
        for path, layer in bank.layers.items():
            plain.get_submodule(path).weight.copy_(layer.base.weight)
    merged, base = forward_fn(bank, batch), forward_fn(plain, batch)
    check_close("merged vs unmerged single expert", merged(), unmerged, s)
    check = check_close("merged bank vs plain model holding the merged weights", merged(), base(), s)
    t = time_interleaved({"merged": merged, "base": base}, s)
    return [Row.ratio("2", f"merged expert vs base model ({b}x{t_len})", ("merged", t["merged"]),
                      ("base", t["base"]), Goal("<=", 1.03), check)]


def _per_sample(batch_size: int, n: int, device: str) -> Tensor:
    """Expert of each sample: ``n`` distinct experts interleaved (0, 1, .., n-1, 0, 1, ..)."""
    return (torch.arange(batch_size) % n).to(device)


def case_mixed(s: Settings) -> list[Row]:
    """3 and 10. Mixed batches of N distinct experts vs one expert, vs PEFT, and N=64 vs N=4."""
    b, t_len = (64, 32) if not s.quick else (8, 4)
    ns = [n for n in (1, 4, 16, 64) if n <= b] if not s.quick else [1, 4, 8]
    model = load_model("minilm", s)
    peft_model = clone_model(model)
    bank = make_bank(model, "minilm", max(ns))
    names = bank.names
    peft = peft_twin(peft_model, "minilm", bank, names)
    batch = token_batch(model, b, t_len, s)
    fns: dict[str, Callable[[], Tensor]] = {"single": forward_fn(bank, batch, Routing.single(0))}
    checks: dict[int, str] = {}
    for n in ns:
        idx = _per_sample(b, n, s.device)
        fns[f"N={n}"] = mixed = forward_fn(bank, batch, Routing.per_sample(idx))
        fns[f"peft N={n}"] = run_peft = forward_fn(
            peft, batch, adapter_names=[names[i] for i in idx.tolist()])
        out = mixed()
        checks[n] = check_close("mixed vs each expert's samples run alone", out,
                                expert_reference(bank, batch, idx), s)
        checks[n] += "; " + check_close("mixed vs PEFT adapter_names", out, run_peft(), s)
    t = time_interleaved(fns, s)
    tokens = b * t_len
    rows = []
    for n in ns:
        key = f"N={n}"
        rows.append(Row.ratio("3", f"mixed {b}x{t_len}, {key} vs single expert", (key, t[key]),
                              ("single", t["single"]), Goal("<=", 1.25), checks[n],
                              tokens_per_s=tokens / t[key].min_s))
        rows.append(Row.ratio("3", f"mixed {b}x{t_len}, {key} vs PEFT adapter_names",
                              (key, t[key]), (f"peft {key}", t[f"peft {key}"]),
                              Goal("<=", 1.0) if n >= 16 else None, checks[n],
                              peft_vs_single=t[f"peft {key}"].min_s / t["single"].min_s))
    hi = f"N={ns[-1]}"
    rows.append(Row.launches("3", f"mixed {b}x{t_len}, {hi}: kernels per forward vs single "
                             "expert (reference)", fns[hi], fns["single"]))
    lo = f"N={ns[1]}"
    rows.append(Row.ratio("10", f"mixed {b}x{t_len}, {hi} vs {lo}", (hi, t[hi]), (lo, t[lo]),
                          Goal("<=", 1.10), f"{checks[ns[-1]]} (both N)"))
    return rows


def case_decode(s: Settings) -> list[Row]:
    """4. Decode shape: 64 sequences x 1 token with 64 distinct experts; uniform fast path."""
    b = 64 if not s.quick else 8
    model = load_model("minilm", s)
    bank = make_bank(model, "minilm", b)
    batch = token_batch(model, b, 1, s)
    idx = torch.arange(b, device=s.device)
    single = forward_fn(bank, batch, Routing.single(0))
    mixed = forward_fn(bank, batch, Routing.per_sample(idx))
    uniform = forward_fn(bank, batch, Routing.per_sample(torch.zeros_like(idx)))
    rows_in = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(b)]

    def loop() -> Tensor:
        return torch.cat([forward_fn(bank, r, Routing.single(i))() for i, r in enumerate(rows_in)])

    check = check_close("mixed vs a loop of one-sample forwards", mixed(), loop(), s)
    check_u = check_close("uniform batch via per_sample vs single", uniform(), single(), s)
    t = time_interleaved({"mixed": mixed, "single": single, "uniform": uniform, "loop": loop}, s)
    return [
        Row.ratio("4", f"decode {b}x1, {b} experts vs single", ("mixed", t["mixed"]),
                  ("single", t["single"]), Goal("<=", 2.0), check),
        Row.launches("4", f"decode {b}x1, {b} experts: kernels per forward vs single (reference)",
                     mixed, single),
        Row.ratio("4", f"decode {b}x1, plain loop vs single (reference)", ("loop", t["loop"]),
                  ("single", t["single"]), None, check),
        Row.ratio("4", f"decode {b}x1, uniform batch via mixed path vs single",
                  ("uniform", t["uniform"]), ("single", t["single"]), Goal("<=", 1.05), check_u),
    ]


def case_growth(s: Settings) -> list[Row]:
    """9. A single-expert forward with 1,000 experts in the bank vs with 1."""
    b, t_len, big = (8, 32, 1000) if not s.quick else (2, 8, 20)
    small_bank = make_bank(load_model("minilm", s), "minilm", 1)
    big_bank = make_bank(load_model("minilm", s), "minilm", big)
    batch = token_batch(small_bank.model, b, t_len, s)
    one = forward_fn(small_bank, batch, Routing.single(0))
    many = forward_fn(big_bank, batch, Routing.single(0))
    check = check_close(f"expert 0 of a {big}-expert bank vs of a 1-expert bank", many(), one(), s)
    t = time_interleaved({"many": many, "one": one}, s)
    return [Row.ratio("9", f"single-expert forward ({b}x{t_len}), {big} experts vs 1",
                      (f"{big} experts", t["many"]), ("1 expert", t["one"]), Goal("<=", 1.05),
                      check)]
