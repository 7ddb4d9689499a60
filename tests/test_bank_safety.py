"""The expert bank refuses what it cannot do right: stale or ill-fitting routings, partial loads,
other base models; and it gives the original model back (issue 11's defects, one test each)."""

from __future__ import annotations

import pytest
import torch
from storage_helpers import edit_json, recommit, version_dir
from torch import nn

from moe_lora import CorruptFileError, ExpertBank, ExpertConfig, Routing


def tiny(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 4, bias=bias))


def bank_of(names: list[str], seed: int = 0) -> ExpertBank:
    bank = ExpertBank(tiny(seed), targets="all-linear")
    for name in names:
        bank.add_expert(name, ExpertConfig(rank=2, init="random"), trainable=False)
    return bank


# ------------------------------------------------------------------ routing
def test_an_active_routing_is_invalidated_by_remove_expert():
    bank = bank_of(["a", "b", "c"])
    x = torch.randn(3, 6)
    with bank.use(Routing.per_sample(torch.tensor([2, 2, 1]))):
        bank.remove_expert("a")  # "c" is index 1 now, "b" index 0
        with pytest.raises(RuntimeError, match="set before an expert was removed"):
            bank(x)
    bank.set_routing(Routing.single(1))
    bank.remove_expert("b")
    with pytest.raises(RuntimeError, match="set before an expert was removed"):
        bank(x)
    with bank.use(0):  # set again: fine
        bank(x)


def test_a_restored_routing_is_invalidated_too():
    bank = bank_of(["a", "b"])
    with bank.use(1):
        with bank.use(0):
            bank.remove_expert("a")
        with pytest.raises(RuntimeError, match="set before an expert was removed"):
            bank(torch.randn(2, 6))


def test_a_router_built_routing_set_after_a_removal_is_refused():
    """A router stamps its routing with the bank layout; built before ``remove_expert`` and set
    after, it would route to the experts that moved into the old indices: refused. A new routing
    from the router, and hand-built routings (no stamp), are accepted."""
    from moe_lora.core.routing import RouterInput
    from moe_lora.routers import TaskRouter, TaskRouterConfig

    bank = bank_of(["a", "b", "c"])
    for i in range(3):
        bank.experts[i].task = i
    router = TaskRouter(TaskRouterConfig(), bank)
    batch = RouterInput(task_ids=torch.tensor([2, 2, 1]))
    old = router.routing(batch)
    assert old.layout == bank.ctx.layout and old.expand(2).layout == old.layout
    bank.remove_expert("a")
    for stale in (old, old.expand(2)):
        with pytest.raises(RuntimeError, match="built before an expert was removed"):
            bank.set_routing(stale)
    with pytest.raises(RuntimeError, match="built before an expert was removed"):
        with bank.use(old):
            pass
    fresh = router.routing(batch)  # "c" (task 2) is index 1 now, "b" (task 1) index 0
    assert fresh.indices[:, 0].tolist() == [1, 1, 0]
    with bank.use(fresh):
        bank(torch.randn(3, 6))
    bank.set_routing(Routing.per_sample(torch.tensor([1, 1, 0])))  # by hand: not stamped


def test_a_routing_for_another_batch_size_is_refused_even_when_uniform():
    bank = bank_of(["a", "b"])
    x = torch.randn(4, 6)
    for routing in (Routing.per_sample(torch.zeros(7, dtype=torch.long)),
                    Routing.per_sample(torch.tensor([0, 1, 0, 1, 0, 1, 0])),
                    Routing.dense(torch.ones(7, 2))):
        with bank.use(routing), pytest.raises(ValueError, match=r"shape \(7, .*expected \(4, "):
            bank(x)


def test_dense_weights_of_the_wrong_shape_are_refused_also_with_one_token():
    bank = bank_of(["a", "b"])
    x = torch.randn(2, 5, 6)
    for weights, expected in ((torch.ones(2, 1, 2), r"\(2, 5, 2\)"),
                              (torch.ones(1, 5, 2), r"\(2, 5, 2\)")):
        with bank.use(Routing.dense(weights)), pytest.raises(ValueError, match=expected):
            bank(x)
    with bank.use(Routing.dense(torch.ones(2, 5, 2))):
        with pytest.raises(ValueError, match=r"per token, but the input \(2, 6\)"):
            bank(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(2, 2\)"):
        bank.set_routing(Routing.dense(torch.ones(2, 3)))


def test_token_routing_must_match_batch_and_tokens():
    bank = bank_of(["a", "b"])
    idx = torch.zeros(2, 4, 1, dtype=torch.long)
    with bank.use(Routing.per_token(idx, torch.ones(2, 4, 1))):
        with pytest.raises(ValueError, match=r"shape \(2, 4, 1\).*expected \(2, 3, 1\)"):
            bank(torch.randn(2, 3, 6))
        bank(torch.randn(2, 4, 6))


@pytest.mark.parametrize("indices", [torch.tensor([0, -2]), torch.tensor([[0, 5]])])
def test_indices_outside_minus_one_and_the_bank_are_refused(indices):
    bank = bank_of(["a", "b"])
    with pytest.raises(IndexError, match="or -1 for no expert"):
        bank.set_routing(Routing.per_sample(indices))
    with pytest.raises(IndexError, match="out of range"):
        bank.set_routing(Routing.per_token(indices.reshape(1, -1, 1),
                                           torch.ones(1, indices.numel(), 1)))
    bank.set_routing(Routing.per_sample(torch.tensor([1, -1])))  # -1: no expert, documented


def test_float_and_bool_indices_are_refused():
    with pytest.raises(ValueError, match="integer tensor, got torch.float32"):
        Routing.per_sample(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="integer tensor, got torch.bool"):
        Routing.per_token(torch.ones(1, 2, 1, dtype=torch.bool), torch.ones(1, 2, 1))
    with pytest.raises(ValueError, match="integer expert index, got 1.0"):
        Routing.single(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be floating"):
        Routing.dense(torch.ones(2, 2, dtype=torch.long))
    bank = bank_of(["a", "b"])
    with pytest.raises(ValueError, match="integer expert index"):
        bank.set_routing(1.5)  # type: ignore[arg-type]
    assert Routing.single(torch.tensor(1)).expert == 1


# ------------------------------------------------------------------ all-or-nothing loads
def test_load_experts_failing_on_the_second_expert_leaves_the_bank_as_it_was(tmp_path):
    bank_of(["a", "b"]).save(tmp_path)
    recommit(tmp_path, lambda tmp: edit_json(
        tmp / "manifest.json", lambda m: m["experts"][1]["config"].update(rank=3)))
    target = bank_of(["x"])
    before = target.expert_state("x")
    with pytest.raises(CorruptFileError, match="tensor 'b/0/lora_A' is of shape"):
        target.load_experts(tmp_path)
    assert target.names == ["x"]
    assert all(torch.equal(before[k], v) for k, v in target.expert_state("x").items())


def test_a_taken_name_is_refused_before_anything_is_added(tmp_path):
    bank_of(["a", "b"]).save(tmp_path)
    target = bank_of(["b"])
    with pytest.raises(ValueError, match=r"already has expert\(s\) named \['b'\]"):
        target.load_experts(tmp_path)
    assert target.names == ["b"]


def test_bank_load_validates_before_wrapping_and_a_retry_works(tmp_path):
    bank_of(["a"], seed=0).save(tmp_path)
    model = tiny(seed=1)  # other weights
    with pytest.raises(ValueError, match="architecture or weights differ"):
        ExpertBank.load(tmp_path, model)
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())
    bank = ExpertBank.load(tmp_path, model, strict_base=False)  # the retry is not refused
    assert bank.names == ["a"]


def test_unload_gives_the_original_model_back():
    model = tiny()
    model[2].weight.requires_grad_(False)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 6)
    expected = model(x)
    bank = ExpertBank(model, targets="all-linear")
    bank.add_expert("a", ExpertConfig(rank=2, init="random"))
    bank.merge("a")
    back = bank.unload()
    assert back is model and isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
    assert model.state_dict().keys() == reference.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    assert model[0].weight.requires_grad and not model[2].weight.requires_grad
    with pytest.raises(RuntimeError, match="unloaded"):
        bank.add_expert("b")
    ExpertBank(model, targets="all-linear")  # the model can be wrapped again


# ------------------------------------------------------------------ the base fingerprint
@pytest.mark.parametrize("change", ["last layer weight", "bias", "architecture"])
def test_the_fingerprint_covers_every_layer_bias_and_the_architecture(tmp_path, change):
    deep = lambda: nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)])  # noqa: E731
    torch.manual_seed(0)
    source = deep()
    ExpertBank(source, targets="all-linear").save(tmp_path)  # no experts: identity only
    torch.manual_seed(0)
    other = deep()
    with torch.no_grad():
        if change == "last layer weight":
            other[3].weight[0, 0] += 1e-3
        elif change == "bias":
            other[1].bias[0] += 1e-3
    if change == "architecture":
        other = nn.ModuleList(list(other))  # same layers and weights, another model class
    with pytest.raises(ValueError, match="architecture or weights differ"):
        ExpertBank(other, targets="all-linear").load_experts(tmp_path)


# ------------------------------------------------------------------ manifests are checksummed
def test_one_bit_in_the_manifest_is_detected(tmp_path):
    bank = ExpertBank(tiny(), targets="all-linear")
    bank.add_expert("a", ExpertConfig(rank=2, alpha=16.0))
    bank.save(tmp_path)
    manifest = version_dir(tmp_path) / "manifest.json"
    text = manifest.read_text()
    assert '"alpha": 16.0' in text
    manifest.write_text(text.replace('"alpha": 16.0', '"alpha": 36.0'))  # one bit: 0x31 -> 0x33
    with pytest.raises(CorruptFileError, match=r"manifest\.json: checksum mismatch"):
        ExpertBank(tiny(), targets="all-linear").load_experts(tmp_path)


def test_an_edited_expert_name_in_a_committed_manifest_is_refused(tmp_path):
    bank_of(["a"]).save(tmp_path)
    recommit(tmp_path, lambda tmp: edit_json(
        tmp / "manifest.json", lambda m: m["experts"][0].update(name="../escape")))
    with pytest.raises(CorruptFileError, match="invalid expert name"):
        bank_of([]).load_experts(tmp_path)
