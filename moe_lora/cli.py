"""The ``moe-lora`` command line.

::

    moe-lora continual CONFIG [key=value ...] [--profile quick] [--resume]
    moe-lora evaluate RUN_DIR                 # evaluate a run's checkpoints on every test set
    moe-lora route RUN_DIR TEXT [TEXT ...]    # which expert each text goes to, with weights
                   [--json]
    moe-lora export RUN_DIR EXPERT OUT_DIR    # one expert in PEFT format
    moe-lora info PATH                        # what a bank folder or a run folder holds

A config error (unknown key, wrong type, missing file) is reported with the key's name before
anything loads. ``evaluate``, ``route`` and ``export`` use the config saved in the run's
checkpoints; ``evaluate`` writes ``evaluation.json`` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_lora.continual.settings import ConfigError, RunConfig, config_from_dict, load_config
from moe_lora.core.io import read_json

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-lora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("continual", help="run a continual-learning benchmark")
    c.add_argument("config", help="a YAML config (see configs/)")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    c.add_argument("--profile", help="a profile of the config's profiles: block, e.g. quick")
    c.add_argument("--resume", action="store_true", help="continue from the last completed task")
    e = sub.add_parser("evaluate", help="evaluate a run's last checkpoints on every test set")
    e.add_argument("run_dir")
    r = sub.add_parser("route", help="which experts of a run texts go to, with weights")
    r.add_argument("run_dir")
    r.add_argument("texts", nargs="+")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    x = sub.add_parser("export", help="export one expert of a run to PEFT format")
    x.add_argument("run_dir")
    x.add_argument("expert")
    x.add_argument("out_dir")
    x.add_argument("--family", default="experts")
    i = sub.add_parser("info", help="describe a bank folder or a run folder")
    i.add_argument("path")
    return p


def _run_config(run_dir: Path) -> RunConfig:
    """The config saved in a run's checkpoints, writing into ``run_dir``, without a progress bar."""
    from moe_lora.continual.checkpoint import saved_config

    return config_from_dict(saved_config(run_dir),
                            [f"output.dir={run_dir}", "train.progress_bar=false"])


def cmd_continual(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, args.profile)  # fails before any work
    from moe_lora.continual.runner import is_rank_zero, run_continual

    run_continual(cfg, resume=args.resume)
    if is_rank_zero():
        print(f"results written to {cfg.output.dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from moe_lora.continual.results import write_evaluation
    from moe_lora.continual.runner import ContinualRunner, group_families

    run_dir = Path(args.run_dir)
    cfg = _run_config(run_dir)
    runner = ContinualRunner(cfg, resume=True)
    strategies: dict[str, Any] = {}
    for family, names in group_families(cfg.strategies.run).items():
        strategies |= _evaluate_family(runner, family, names)
    write_evaluation({"run_dir": str(run_dir), "benchmark": runner.stream.benchmark,
                      "tasks": [t.name for t in runner.stream], "strategies": strategies}, run_dir)
    return 0


def _evaluate_family(runner: Any, family: str, names: list[str]) -> dict[str, Any]:
    """Evaluate ``family``'s last checkpoint on the test set of every task it has seen."""
    from moe_lora.continual.runner import SETTING

    ctx = runner.open_family(family, names)
    state = ctx.state
    if state.completed == 0:
        raise FileNotFoundError(f"{runner.out / 'checkpoints' / family}: no completed task")
    state.matrices, state.router = {}, {}  # only what is evaluated now
    ctx.evaluate(state.completed - 1)
    row = ctx.nt - 1 if family == "joint" else state.completed - 1
    out = {}
    for name in names:
        routed = state.router[name][-1]
        out[name] = {"setting": SETTING[name], "family": family, "completed_tasks": state.completed,
                     **_row(state.matrix(name, "agnostic", ctx.nt)[row], row),
                     "router_accuracy": routed}
        if family != "experts":
            out[name]["task_aware"] = _row(state.matrix(name, "aware", ctx.nt)[row], row)
    return out


def _row(accuracy: list[float], row: int) -> dict[str, Any]:
    """Per-task accuracies (nan as None) and their mean over the tasks seen (``0..row``)."""
    acc = [None if a != a else float(a) for a in accuracy]
    seen = [a for a in acc[: row + 1] if a is not None]
    return {"accuracy": acc, "average_accuracy": sum(seen) / len(seen) if seen else None}


def _restore(run_dir: Path, family: str) -> tuple[RunConfig, Any, Any, Any, Any]:
    """(config, stream, backbone, bank, family state) of ``family``'s last checkpoint.

    Only the base model is loaded (no stream preparation), for ``route`` and ``export``.
    """
    from moe_lora.continual.checkpoint import load_family
    from moe_lora.continual.module import TaskHeads
    from moe_lora.continual.runner import build_backbone, stream_config
    from moe_lora.core.bank import ExpertBank
    from moe_lora.data import build_stream

    cfg = _run_config(run_dir)
    stream = build_stream(stream_config(cfg))
    backbone = build_backbone(cfg, stream)
    bank = ExpertBank(backbone.model, targets=backbone.lora_targets(cfg.model.targets),
                      base_id=cfg.model.name)
    ckpt = run_dir / "checkpoints" / family
    state = load_family(ckpt, bank, TaskHeads(backbone.dim, stream.n_classes))
    if state is None:
        raise FileNotFoundError(f"{ckpt}: no completed checkpoint (latest.json)")
    return cfg, stream, backbone, bank, state


class _BaseEncoder:
    """Texts -> L2-normalised base embeddings ``[N, D]``, computed as the runner's routing keys."""

    def __init__(self, backbone: Any, bank: Any):
        self.backbone, self.bank = backbone, bank

    def encode(self, texts: Sequence[str], prefix: str | None = None) -> Any:
        import torch
        import torch.nn.functional as F

        with torch.no_grad(), self.bank.use(None):
            feats = self.backbone(self.backbone.collate(self.backbone.prefix(list(texts))))
        return F.normalize(feats, dim=-1).numpy()


def cmd_route(args: argparse.Namespace) -> int:
    from moe_lora.core.routing import RouterInput

    run_dir = Path(args.run_dir)
    cfg, stream, backbone, bank, state = _restore(run_dir, "experts")
    if state.index is None:
        raise ConfigError(f"{run_dir}: the experts family has no retrieval index "
                          "(run experts-retrieval or experts-confidence)")
    if cfg.model.name == "mlp":
        raise ConfigError(f"{run_dir}: model.name=mlp takes feature vectors, not texts")
    encoder = _BaseEncoder(backbone, bank)
    router = state.retrieval_router(bank, cfg, encoder, state.index.dim)
    chosen = router.route(RouterInput(texts=args.texts)).indices[:, 0].tolist()
    weights = _expert_weights(state.index, encoder.encode(args.texts), cfg)
    rows = []
    for text, pick, w in zip(args.texts, chosen, weights, strict=True):
        experts = [_expert_row(bank, stream, state.index_names[eid], v)
                   for eid, v in sorted(w.items(), key=lambda kv: -kv[1])]
        rows.append({"text": text, "chosen": _expert_row(bank, stream, bank.names[pick], None),
                     "experts": experts})
    print(json.dumps(rows, indent=2) if args.json else _format_routes(rows))
    return 0


def _expert_weights(index: Any, queries: Any, cfg: RunConfig) -> list[dict[int, float]]:
    """Per text, index expert id -> weight: the exemplar kNN vote shares, or (centroid mode)
    ``softmax(cosine / temperature)``; every indexed expert, summing to 1 per text."""
    import numpy as np

    ids, scores = index.search(queries, len(index.expert_ids))
    rc = cfg.strategies.retrieval
    if rc.mode == "centroid":
        scores = np.exp((scores - scores.max(1, keepdims=True)) / rc.temperature)
    scores = np.where(ids >= 0, np.nan_to_num(scores, neginf=0.0), 0.0)
    scores = scores / np.clip(scores.sum(1, keepdims=True), 1e-12, None)
    zero = dict.fromkeys(index.expert_ids, 0.0)  # experts without a vote get weight 0
    return [zero | {int(i): float(s) for i, s in zip(r, sr, strict=True) if i >= 0}
            for r, sr in zip(ids, scores, strict=True)]


def _expert_row(bank: Any, stream: Any, name: str, weight: float | None) -> dict[str, Any]:
    task = bank.info(name).task
    row = {"expert": name, "task": task, "task_name": stream[int(task)].name}
    return row if weight is None else row | {"weight": round(weight, 6)}


def _format_routes(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        c = r["chosen"]
        lines.append(f"{r['text']!r}\n  routed to {c['expert']} (task {c['task']}: {c['task_name']})")
        lines += [f"    {e['expert']:<12} task {e['task']}: {e['task_name']:<28} weight {e['weight']:.3f}"
                  for e in r["experts"]]
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    from moe_lora.interop.peft import export_peft

    run_dir = Path(args.run_dir)
    cfg, _, _, bank, _ = _restore(run_dir, args.family)
    if args.expert not in bank.names:
        raise ConfigError(f"{run_dir}: family {args.family!r} has no expert {args.expert!r}; "
                          f"it has {bank.names}")
    out = export_peft(bank, args.out_dir, args.expert, base_model_name_or_path=cfg.model.name)
    print(f"expert {args.expert!r} written to {out} (PEFT adapter_config.json + "
          "adapter_model.safetensors)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / "manifest.json").is_file():
        from moe_lora.core.storage import read_manifest

        m = read_manifest(path)
        print(f"bank of base {m['base']['id']!r}: {len(m['layers'])} LoRA layers")
        for e in m["experts"]:
            print(f"  {e['name']}: task={e['task']} rank={e['config']['rank']} "
                  f"steps={e['trained_steps']}")
        return 0
    if (path / "results.json").is_file():
        from moe_lora.continual.results import format_table

        results = read_json(path / "results.json")
        print(f"run of {results['benchmark']}: tasks {results.get('tasks')}")
        print(format_table(results))
        for ckpt in sorted((path / "checkpoints").glob("*/latest.json")):
            print(f"  checkpoint {ckpt.parent.name}: {read_json(ckpt)['completed']} tasks done")
        return 0
    print(f"{path}: neither a bank folder (manifest.json) nor a run folder (results.json)",
          file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``moe-lora``; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "continual" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # key=value overrides given after --profile/--resume
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    handlers = {"continual": cmd_continual, "evaluate": cmd_evaluate, "route": cmd_route,
                "export": cmd_export, "info": cmd_info}
    try:
        return handlers[args.command](args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"moe-lora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
