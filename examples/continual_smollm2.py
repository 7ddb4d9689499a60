"""Continual LoRA experts on SmolLM2-135M: each WordNet task becomes "gloss -> supersense" generation.

One expert per task is fine-tuned with the causal-LM loss on the label tokens only (MoELoRAModule,
kind="causal-lm"), earlier experts frozen. A test gloss is classified by scoring every candidate
label of its task under the task's expert (task-aware) and the label with the lowest loss wins.
The mean loss of the true labels on the task's test glosses is printed before and after training.

    python examples/continual_smollm2.py           # 2 tasks x 3 classes, ~3 min on 2 CPU cores
    python examples/continual_smollm2.py --fast    # a smoke run (the tests run it), ~1 min

The last line printed is JSON: the accuracy matrix and the label losses before/after each task.
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from moe_lora import ExpertBank, ExpertConfig, Routing
from moe_lora.continual.module import MoELoRAModule, TrainPlan
from moe_lora.continual.settings import TrainConfig
from moe_lora.data import WordNetStreamConfig, build_wordnet_stream
from moe_lora.models import load_base


def prompt(text: str) -> str:
    return f"Gloss: {text}\nSupersense:"


def encode(tok, texts: list[str], labels: list[str], max_prompt: int = 96) -> dict[str, torch.Tensor]:
    """Prompt + " label" + eos; ``labels`` are -100 except on the label tokens."""
    rows = []
    for text, label in zip(texts, labels, strict=True):
        p = tok(prompt(text), add_special_tokens=False)["input_ids"][-max_prompt:]
        a = tok(" " + label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    n = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (n - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (n - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in rows]),
    }
    return batch


@torch.no_grad()
def label_losses(bank: ExpertBank, tok, texts: list[str], classes: list[str], expert: int,
                 max_prompt: int) -> torch.Tensor:
    """Mean token loss of every candidate label after every text's prompt ``[N, C]``."""
    losses = []
    for c in classes:
        b = encode(tok, texts, [c] * len(texts), max_prompt)
        with bank.use(Routing.single(expert)):
            logits = bank.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        tgt = b["labels"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        losses.append(ce.sum(1) / (tgt != -100).sum(1))
    return torch.stack(losses, 1)


def true_label_loss(losses: torch.Tensor, truth: list[int]) -> float:
    return float(losses.gather(1, torch.tensor(truth)[:, None]).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    n_train, n_test, max_prompt, bs = (4, 3, 32, 4) if args.fast else (24, 20, 96, 8)
    stream = build_wordnet_stream(WordNetStreamConfig(
        n_tasks=2, classes_per_task=3, train_per_class=n_train, val_per_class=0,
        test_per_class=n_test))
    base = load_base("smollm2-135m", task="causal-lm")
    tok = base.tokenizer
    bank = ExpertBank(base.model, targets=base.default_targets, base_id="smollm2-135m")
    train_cfg = TrainConfig(lr=2e-3, lora_plus_ratio=4.0)
    name = lambda c: c.split(".")[1]  # noqa: E731  "noun.animal" -> "animal"
    acc = torch.full((len(stream), len(stream)), float("nan"))
    loss = {"before": [], "after": []}
    for task in stream:
        bank.freeze()
        active = bank.add_expert(f"task{task.task_id + 1}", ExpertConfig(rank=8), task=task.task_id)
        module = MoELoRAModule(bank, train_cfg, TrainPlan(routing="single", active=active,
                                                          kind="causal-lm"))
        texts, classes = list(task.test.inputs), [name(c) for c in task.classes]
        truth = task.to_local(task.test.labels).tolist()
        scores = label_losses(bank, tok, texts, classes, active, max_prompt)  # B = 0: the base
        loss["before"].append(true_label_loss(scores, truth))
        labels = [name(stream.class_names[int(y)]) for y in task.train.labels]
        data = list(zip(task.train.inputs, labels, strict=True))
        dl = DataLoader(data, batch_size=bs, shuffle=True, collate_fn=lambda b: encode(
            tok, [x for x, _ in b], [y for _, y in b], max_prompt))
        L.Trainer(max_epochs=1 if args.fast else 2, logger=False, enable_checkpointing=False,
                  enable_model_summary=False, enable_progress_bar=False,
                  accelerator="cpu").fit(module, dl)
        for seen in stream.tasks[: task.task_id + 1]:
            texts, classes = list(seen.test.inputs), [name(c) for c in seen.classes]
            truth = seen.to_local(seen.test.labels).tolist()
            scores = label_losses(bank, tok, texts, classes, seen.task_id, max_prompt)
            pred = scores.argmin(1).tolist()
            acc[task.task_id, seen.task_id] = sum(p == t for p, t in zip(pred, truth, strict=True)) / len(truth)
            if seen.task_id == task.task_id:
                loss["after"].append(true_label_loss(scores, truth))
        print(f"after task {task.task_id}: accuracy on seen tasks {acc[task.task_id, : task.task_id + 1].tolist()}, "
              f"true-label loss {loss['before'][-1]:.3f} -> {loss['after'][-1]:.3f}")
    print("accuracy matrix (task-aware, chance = 1/3):\n", acc)
    print(json.dumps({"accuracy_matrix": acc.tolist(), "label_loss": loss}))


if __name__ == "__main__":
    main()
