"""Generation with mixed experts: every row of a batch decodes as it would alone with its experts.

The reference is either the same prompt generated alone with its expert, or a plain greedy loop
that re-runs the whole sequence at every step without a cache (so no expansion, no decode step).
"""

from __future__ import annotations

import pytest
import torch
from serving_helpers import random_smollm2_bank
from transformers import LlamaConfig, LlamaForCausalLM

from moe_lora import ExpertBank, ExpertConfig, RouterInput, Routing
from moe_lora.core.generation import generate
from moe_lora.routers import (
    MoLEConfig,
    MoLERouter,
    TaskRouter,
    TaskRouterConfig,
    TopKConfig,
    TopKRouter,
)

NEW = 6
GREEDY = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama whose logits are far apart (argmax is not decided by rounding)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def strong_bank(model: torch.nn.Module, names: str = "abc") -> ExpertBank:
    """A bank of random experts large enough to change the greedy tokens."""
    bank = ExpertBank(model, targets=["q_proj", "v_proj"], base_id="tiny")
    for name in names:
        bank.add_expert(name, ExpertConfig(rank=4, init="random"))
        with torch.no_grad():
            for p in bank.expert_parameters(name).values():
                p.mul_(20)
    bank.freeze()
    return bank


@pytest.fixture
def bank() -> ExpertBank:
    return strong_bank(tiny_llama())


@pytest.fixture
def prompts() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 97, (3, 5))


def greedy_reference(bank: ExpertBank, ids: torch.Tensor, routing_of, steps: int = NEW):
    """Greedy decoding without a cache: the full sequence is re-run under ``routing_of(ids)``."""
    for _ in range(steps):
        with torch.no_grad(), bank.use(routing_of(ids)):
            logits = bank.model(input_ids=ids).logits[:, -1]
        logits[:, 2] = -torch.inf  # as min_new_tokens: no EOS
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_expand_repeats_each_sample_in_a_row() -> None:
    r = Routing.per_sample(torch.tensor([[0, 1], [2, -1]]), torch.tensor([[0.5, 0.5], [1.0, 0]]))
    e = r.expand(3)
    assert e.indices.tolist() == [[0, 1]] * 3 + [[2, -1]] * 3
    assert e.weights.shape == (6, 2)
    assert Routing.single(1).expand(4) == Routing.single(1)
    with pytest.raises(ValueError, match="n >= 1"):
        r.expand(0)


def test_greedy_mixed_batch_equals_each_row_alone(bank, prompts) -> None:
    routing = Routing.per_sample(torch.tensor([0, 2, -1]))  # the last row: no expert (base)
    out = generate(bank, prompts, routing=routing, **GREEDY)
    for i, spec in enumerate(["a", "c", None]):
        alone = generate(bank, prompts[i : i + 1], routing=spec or Routing.base(), **GREEDY)
        assert torch.equal(out[i], alone[0]), i
    ref = greedy_reference(bank, prompts, lambda ids: routing)
    assert torch.equal(out, ref)
    assert not torch.equal(out[0], generate(bank, prompts[:1], routing="b", **GREEDY)[0])


def test_left_padded_rows_equal_a_uniform_batch(bank, prompts) -> None:
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0
    ids = prompts.masked_fill(mask == 0, 0)
    mixed = generate(bank, ids, mask, routing=Routing.per_sample(torch.tensor([1, 0, 2])), **GREEDY)
    for i, name in enumerate("bac"):
        uniform = generate(bank, ids, mask, routing=name, **GREEDY)
        assert torch.equal(mixed[i], uniform[i]), i


def test_beam_search_with_returned_sequences(bank, prompts) -> None:
    kw = {**GREEDY, "num_beams": 3, "num_return_sequences": 2}
    out = generate(bank, prompts, routing=Routing.per_sample(torch.tensor([2, 0, 1])), **kw)
    assert out.shape[0] == 6
    for i, name in enumerate("cab"):
        alone = generate(bank, prompts[i : i + 1], routing=name, **kw)
        assert torch.equal(out[2 * i : 2 * i + 2], alone), i


def test_without_generate_the_routing_does_not_fit_the_beams(bank, prompts) -> None:
    """The failure this module fixes: a prompt's routing against the expanded batch."""
    with bank.use(Routing.per_sample(torch.tensor([0, 1, 2]))), pytest.raises(ValueError,
                                                                              match=r"shape \(3, 1\) does not fit"):
        bank.model.generate(input_ids=prompts, num_beams=2, **GREEDY)
    with pytest.raises(ValueError, match="routing has 2 samples but 3 prompts"):
        generate(bank, prompts, routing=Routing.per_sample(torch.tensor([0, 1])), **GREEDY)


def test_sampling_rows_draw_from_their_own_experts(bank, prompts) -> None:
    routing = Routing.per_sample(torch.tensor([[0, 1], [2, -1], [1, -1]]),
                                 torch.tensor([[0.3, 0.7], [1.0, 0.0], [1.0, 0.0]]))
    torch.manual_seed(3)
    out = generate(bank, prompts, routing=routing, do_sample=True, max_new_tokens=NEW,
                   num_return_sequences=2, pad_token_id=0, return_dict_in_generate=True,
                   output_logits=True)
    logits = torch.stack(out.logits, dim=1)  # [6, NEW, V]
    for row in range(6):
        sample = row // 2
        alone = Routing.per_sample(routing.indices[sample : sample + 1],
                                   routing.weights[sample : sample + 1])
        with torch.no_grad(), bank.use(alone):
            ref = bank.model(input_ids=out.sequences[row : row + 1, :-1]).logits[0, 4:]
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4)


def test_dense_routing_expands(bank, prompts) -> None:
    w = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]])
    out = generate(bank, prompts, routing=Routing.dense(w), num_beams=2, **GREEDY)
    for i in range(3):
        alone = generate(bank, prompts[i : i + 1], routing=Routing.dense(w[i : i + 1]),
                         num_beams=2, **GREEDY)
        assert torch.equal(out[i], alone[0])


def test_per_token_routing_extends_with_the_last_prompt_token(bank, prompts) -> None:
    b, t = prompts.shape
    constant = Routing.per_token(torch.tensor([0, 2, 1])[:, None, None].expand(b, t, 1),
                                 torch.ones(b, t, 1))
    per_sample = generate(bank, prompts, routing=Routing.per_sample(torch.tensor([0, 2, 1])),
                          **GREEDY)
    assert torch.equal(generate(bank, prompts, routing=constant, num_beams=2, **GREEDY)[:, :t],
                       prompts)
    assert torch.equal(generate(bank, prompts, routing=constant, **GREEDY), per_sample)
    torch.manual_seed(2)
    varying = Routing.per_token(torch.randint(0, 3, (b, t, 1)), torch.ones(b, t, 1))
    cached = generate(bank, prompts, routing=varying, **GREEDY)

    def extended(ids: torch.Tensor) -> Routing:
        pos = torch.arange(ids.shape[1]).clamp_max(t - 1)
        return Routing.per_token(varying.indices[:, pos], varying.weights[:, pos])

    assert torch.equal(cached, greedy_reference(bank, prompts, extended))
    assert torch.equal(generate(bank, prompts, routing=varying, use_cache=False, **GREEDY), cached)
    short = Routing.per_token(varying.indices[:, :3], varying.weights[:, :3])
    with pytest.raises(ValueError, match="covers 3 positions, the prompt has 5"):
        generate(bank, prompts, routing=short, **GREEDY)


@pytest.mark.parametrize("gate", ["topk", "mole"])
def test_gated_routers_recompute_at_every_step(bank, prompts, gate) -> None:
    if gate == "topk":
        router = TopKRouter(TopKConfig(k=1), bank).attach()
        with torch.no_grad():
            for g in router.gates.values():
                g.weight.normal_(0, 1.0)
    else:
        router = MoLERouter(MoLEConfig(), bank).attach()
        with torch.no_grad():
            for g in router.gates.values():
                g.weight.normal_(0, 5.0)
    router.set_attention_mask(torch.ones(3, 5))  # a prompt's mask must not break decoding
    out = generate(bank, prompts, routing=router, **GREEDY)
    ref = greedy_reference(
        bank, prompts, lambda ids: router.routing(RouterInput(attention_mask=torch.ones_like(ids))))
    assert torch.equal(out, ref)
    beams = generate(bank, prompts, routing=router, num_beams=2, **GREEDY)
    for i in range(3):
        alone = generate(bank, prompts[i : i + 1], routing=router, num_beams=2, **GREEDY)
        assert torch.equal(beams[i], alone[0])


def test_a_sample_router_is_asked_once_and_expanded(bank, prompts) -> None:
    for i, name in enumerate(bank.names):
        bank.info(name).task = i
    router = TaskRouter(TaskRouterConfig(), bank)
    calls = []
    routing = router.routing

    def counting(batch: RouterInput) -> Routing:
        calls.append(batch)
        return routing(batch)

    router.routing = counting  # type: ignore[method-assign]
    tasks = RouterInput(task_ids=torch.tensor([2, 0, 1]))
    out = generate(bank, prompts, routing=router, router_input=tasks, num_beams=2, **GREEDY)
    assert len(calls) == 1
    ref = generate(bank, prompts, routing=Routing.per_sample(torch.tensor([2, 0, 1])),
                   num_beams=2, **GREEDY)
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_smollm2_mixed_batch_equals_rows_alone(smollm2) -> None:
    model, tok = smollm2
    bank = random_smollm2_bank(model)
    texts = ["The capital of France is", "def fibonacci(n):"]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.eos_token_id}
    routing = Routing.per_sample(torch.tensor([0, 1]))
    for extra in ({}, {"num_beams": 2, "num_return_sequences": 2}):
        out = generate(bank, batch["input_ids"], batch["attention_mask"], routing=routing,
                       **kw, **extra)
        n = extra.get("num_return_sequences", 1)
        for i, name in enumerate(("poet", "coder")):
            uniform = generate(bank, batch["input_ids"], batch["attention_mask"], routing=name,
                               **kw, **extra)
            assert torch.equal(out[i * n : (i + 1) * n], uniform[i * n : (i + 1) * n])
        base = generate(bank, batch["input_ids"], batch["attention_mask"], routing=None, **kw)
        assert not torch.equal(out[: len(texts) * n : n], base)
