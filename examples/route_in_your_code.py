"""Use moe-lora routers from plain PyTorch (no Lightning): a bank of two task experts, then
task-id, top-k (MixLoRA), MoLE, LoRAHub and retrieval (LoRARetriever) routing.

    python examples/route_in_your_code.py [--fast] [--out routing_plots]
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, RouterInput
from moe_lora.routers import (
    LoRAHubConfig,
    LoRAHubRouter,
    MoLEConfig,
    MoLERouter,
    RetrievalConfig,
    RetrievalRouter,
    TaskRouter,
    TaskRouterConfig,
    TopKConfig,
    TopKRouter,
)

TEXTS = [
    ["a dog chases the cat", "the horse eats hay", "birds sing in the morning"],
    ["the stock market fell today", "interest rates rise again", "the bank raised its fees"],
]


def make_task(t: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Task t: inputs around centre t [n, 4, 8]; targets a fixed random map; one text per sample."""
    centre = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * 2
    target_map = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.3
    x = centre[t] + 0.5 * torch.randn(n, 4, 8, generator=torch.Generator().manual_seed(seed))
    return x, x @ target_map[t], [TEXTS[t][i % 3] for i in range(n)]


def train(params: list[nn.Parameter], step_fn, steps: int, lr: float) -> float:
    """A plain PyTorch loop: ``step_fn()`` returns the loss of one batch."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = step_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fast", action="store_true", help="fewer steps (used by the tests)")
    parser.add_argument("--out", type=Path, default=Path("routing_plots"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    steps = 60 if args.fast else 300
    mse = nn.functional.mse_loss

    # 1. a frozen base model with one LoRA expert per task, trained with bank.use(name)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    bank = ExpertBank(model, targets=["0"])
    data = [make_task(t, 64, seed=t) for t in range(2)]
    for t, (x, y, _) in enumerate(data):
        bank.add_expert(f"task{t}", ExpertConfig(rank=4, alpha=8), task=t)

        def step(x=x, y=y, name=f"task{t}"):
            with bank.use(name):
                return mse(bank.model(x), y)

        print(f"expert task{t}: loss {train(bank.trainable_parameters(), step, steps, 0.02):.4f}")
        bank.freeze(f"task{t}")

    # a mixed test batch: samples of both tasks
    parts = [make_task(t, 32, seed=10 + t) for t in range(2)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    texts = parts[0][2] + parts[1][2]
    task_ids = torch.arange(2).repeat_interleave(32)
    batch = RouterInput(texts=texts, task_ids=task_ids)

    # 2. task-id routing: each sample to its task's expert, in one forward
    with torch.no_grad():
        print(f"base model (no expert): test loss {mse(bank.model(x), y):.4f}")
    task_router = TaskRouter(TaskRouterConfig(), bank)
    with torch.no_grad(), bank.use(task_router.routing(batch)):
        print(f"task-id routing: test loss {mse(bank.model(x), y):.4f}")

    # 3. layer gates: top-k (MixLoRA) and MoLE learn which expert fits which input
    x_train, y_train = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    for router in (
        TopKRouter(TopKConfig(k=1, normalize=False), bank),
        MoLERouter(MoLEConfig(), bank),
    ):
        router.attach()

        def gate_step(router=router):
            with bank.use(router.routing()):
                return mse(bank.model(x_train), y_train) + bank.pop_aux_loss()

        train(router.parameters(), gate_step, steps, 0.05)
        with torch.no_grad(), bank.use(router.routing()):
            loss = mse(bank.model(x), y)
        (gate,) = router.gates.values()
        picked = gate.last_probs.reshape(64, 4, 2).mean(1).argmax(-1)
        accuracy = (picked == task_ids).float().mean()
        print(f"{type(router).__name__}: test loss {loss:.4f}, own expert {accuracy:.0%}")
        csv_path, _ = router.save_weights(args.out / type(router).__name__)
        print(f"  mean gate weights per layer written to {csv_path} (+ .png)")
        bank.detach_gates()

    # 4. LoRAHub: a new task solved by a gradient-free combination of the two experts
    x_new, y_new = x[:8], 0.7 * y[:8] + 0.3 * x[:8] @ (torch.randn(8, 8) * 0.1)
    hub = LoRAHubRouter(LoRAHubConfig(composition="output", keep="weights", budget=30), bank)
    result = hub.fit(lambda: mse(bank.model(x_new), y_new))
    print(f"LoRAHub: weights {result.weights}, few-shot loss {result.task_loss:.4f}")

    # 5. retrieval: each sample's text finds its expert (MiniLM embeddings + FAISS)
    retriever = RetrievalRouter(RetrievalConfig(k=1), bank)
    for t in range(2):
        retriever.index_expert(f"task{t}", TEXTS[t])
    with torch.no_grad(), bank.use(retriever.routing(batch)):
        loss = mse(bank.model(x), y)
    hit = (retriever.last_weights.argmax(-1) == task_ids).float().mean()
    print(f"retrieval routing: test loss {loss:.4f}, own expert {hit:.0%}")


if __name__ == "__main__":
    main()
