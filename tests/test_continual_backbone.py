"""The cached-prefix forward equals the full model; O-LoRA's loss equals a per-expert loop."""

import pytest
import torch

from moe_lora import ExpertBank, ExpertConfig, Routing
from moe_lora.continual.module import MoELoRAModule, TaskHeads, TrainPlan
from moe_lora.continual.olora import l2_norm, olora_loss, orthogonality
from moe_lora.continual.settings import TrainConfig
from moe_lora.models.backbones import EncoderBackbone, MLPBackbone

TEXTS = ["dog: a member of the genus Canis", "run: move fast by using one's feet", "x",
         "bank: sloping land beside a body of water, especially a river or a lake"]


@pytest.mark.parametrize("lora_layers", [1, 2, 0])
def test_cached_prefix_equals_full_forward(minilm, lora_layers):
    model, tok = minilm
    bb = EncoderBackbone(model, tok, lora_layers=lora_layers, max_length=64)
    bank = ExpertBank(model, targets=bb.lora_targets([]), base_id="minilm")
    assert all(p.startswith(f"encoder.layer.{i}") for p in bank.layers
               for i in [int(p.split(".")[2])] if i >= bb.split)
    bank.add_expert("a", ExpertConfig(init="random"))
    bank.add_expert("b", ExpertConfig(rank=4, init="random"))
    routing = Routing.per_sample(torch.tensor([0, 1, 1, 0]))
    with torch.no_grad(), bank.use(routing):
        cached = bb(bb.collate(bb.prefix(TEXTS)))
        full = bb.full_forward(TEXTS)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), bank.use(None):
        base = bb.full_forward(TEXTS)
    assert (base - full).abs().max() > 1e-3  # the experts do act


@pytest.mark.parametrize(("lora_layers", "count"), [(2, 3), (2, 1), (1, 2), (0, 7)])
def test_layer_features_equal_the_models_own_hidden_states(minilm, lora_layers, count):
    """The multi-layer frozen features are the models' hidden states, mean-pooled, L2-normed,
    and the last of them is the base embedding (one expert-free pass, taps above the cache)."""
    from moe_lora.continual.prepared import Examples, feature_layers, frozen_tables

    model, tok = minilm
    bb = EncoderBackbone(model, tok, lora_layers=lora_layers, max_length=64)
    bank = ExpertBank(model, targets=bb.lora_targets([]), base_id="minilm")
    bank.add_expert("a", ExpertConfig(init="random"))  # present but not used by the taps
    assert feature_layers(count, bb) == count
    ex = Examples(bb.prefix(TEXTS), torch.zeros(4, dtype=torch.long),
                  torch.zeros(4, dtype=torch.long), list(TEXTS))
    emb, feat = frozen_tables(ex, bb, bank, count, batch_size=3)
    with torch.no_grad():
        t = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**t, output_hidden_states=True).hidden_states  # embeddings, block 1..n
    m = t["attention_mask"].unsqueeze(-1).float()
    ref = torch.cat([torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
                     for h in hidden[len(hidden) - count:]], 1)
    got = torch.stack([torch.from_numpy(feat[k]) for k in TEXTS])
    assert got.shape == (4, count * bb.dim)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([torch.from_numpy(emb[k]) for k in TEXTS]),
                               ref[:, -bb.dim:], atol=2e-5, rtol=1e-4)


def test_feature_layers_beyond_the_cache_is_a_config_error(minilm):
    from moe_lora.continual.prepared import feature_layers
    from moe_lora.continual.settings import ConfigError

    model, tok = minilm
    bb = EncoderBackbone(model, tok, lora_layers=2)
    assert feature_layers(0, bb) == 3  # automatic: the cached state and the two LoRA blocks
    with pytest.raises(ConfigError, match=r"model.feature_layers=4.*at most 3"):
        feature_layers(4, bb)
    assert feature_layers(0, MLPBackbone(8, hidden=16)) == 1
    with pytest.raises(ConfigError, match="model.feature_layers=2"):
        feature_layers(2, MLPBackbone(8, hidden=16))


def test_olora_orthogonality_is_one_matmul_per_layer_equal_to_loop():
    bb = MLPBackbone(16, hidden=32, depth=2)
    bank = ExpertBank(bb.model, targets=bb.lora_targets([]))
    for i, r in enumerate([4, 2, 8]):
        bank.add_expert(f"e{i}", ExpertConfig(rank=r, init="random"))
    bank.freeze("e0")
    bank.freeze("e1")
    hand = sum(
        (layer.experts[p].lora_A @ layer.experts[2].lora_A.t()).abs().sum()
        for layer in bank.layers.values() for p in (0, 1)
    )
    torch.testing.assert_close(orthogonality(bank, 2, [0, 1]), hand)
    norm = torch.sqrt(sum((f.lora_A ** 2).sum() + (f.lora_B ** 2).sum()
                          for f in (layer.experts[2] for layer in bank.layers.values())))
    torch.testing.assert_close(l2_norm(bank, 2), norm)
    loss = olora_loss(bank, 2, [0, 1], lambda1=0.5, lambda2=0.1)
    torch.testing.assert_close(loss, 0.5 * hand + 0.1 * norm)
    loss.backward()
    assert bank.layers["0"].experts[2].lora_A.grad is not None
    assert bank.layers["0"].experts[0].lora_A.grad is None  # earlier experts stay frozen
    assert float(orthogonality(bank, 0, [])) == 0.0


def test_lora_plus_gives_b_a_larger_learning_rate():
    bb = MLPBackbone(8, hidden=16, depth=1)
    bank = ExpertBank(bb.model, targets=bb.lora_targets([]))
    bank.add_expert("e")
    heads = TaskHeads(16, 4)
    heads.add([0, 1])
    module = MoELoRAModule(bank, TrainConfig(lr=1e-3, lora_plus_ratio=16.0), TrainPlan(), bb, heads)
    groups = module.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert len(groups[1]["params"]) == 1  # the one lora_B; A and the head train at lr


def test_heads_logits_and_freezing():
    heads = TaskHeads(3, 5)
    heads.add([3, 4])
    heads.add([0])
    out = heads(torch.ones(2, 3))
    assert torch.isinf(out[:, [1, 2]]).all() and torch.isfinite(out[:, [0, 3, 4]]).all()
    heads.set_trainable(0, False)
    assert not heads.weights[0].requires_grad and heads.weights[1].requires_grad
