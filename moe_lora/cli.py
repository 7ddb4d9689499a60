"""The ``moe-lora`` command line.

::

    moe-lora continual CONFIG [key=value ...] [--profile quick] [--resume]
    moe-lora evaluate RUN_DIR                 # re-evaluate a finished run's checkpoints
    moe-lora route RUN_DIR TEXT [TEXT ...]    # which expert each text goes to, with weights
    moe-lora export RUN_DIR EXPERT OUT_DIR    # one expert in PEFT format
    moe-lora info PATH                        # what a bank folder or a run folder holds

A config error (unknown key, wrong type) is reported with the key's name before anything loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from moe_lora.io import read_json
from moe_lora.settings import ConfigError, RunConfig, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-lora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("continual", help="run a continual-learning benchmark")
    c.add_argument("config", help="a YAML config (see configs/)")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    c.add_argument("--profile", help="a profile of the config's profiles: block, e.g. quick")
    c.add_argument("--resume", action="store_true", help="continue from the last completed task")
    e = sub.add_parser("evaluate", help="print a finished run's results table")
    e.add_argument("run_dir")
    r = sub.add_parser("route", help="route texts with a finished run's retrieval index")
    r.add_argument("run_dir")
    r.add_argument("texts", nargs="+")
    x = sub.add_parser("export", help="export one expert of a run to PEFT format")
    x.add_argument("run_dir")
    x.add_argument("expert")
    x.add_argument("out_dir")
    x.add_argument("--family", default="experts")
    i = sub.add_parser("info", help="describe a bank folder or a run folder")
    i.add_argument("path")
    return p


def _run_config(run_dir: Path, **overrides: str) -> RunConfig:
    """The config a run was made with (from its results.json), with ``overrides``."""
    cfg = read_json(run_dir / "results.json")["config"]
    dots = [f"{k}={v}" for k, v in _flatten(cfg)] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, dots)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:  # type: ignore[type-arg]
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, json.dumps(v) if isinstance(v, list) else ("null" if v is None else v)))
    return out


def cmd_continual(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, args.profile)  # fails before any work
    from moe_lora.continual import is_rank_zero, run_continual

    run_continual(cfg, resume=args.resume)
    if is_rank_zero():
        print(f"results written to {cfg.output.dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from moe_lora.continual import run_continual

    run_dir = Path(args.run_dir)
    cfg = _run_config(run_dir, **{"output.dir": str(run_dir), "train.progress_bar": "false"})
    run_continual(cfg, resume=True)  # every task is complete: loads checkpoints, re-evaluates none
    return 0


def _checkpoint_dir(run_dir: Path, family: str) -> Path:
    ckpt = run_dir / "checkpoints" / family
    latest = read_json(ckpt / "latest.json")
    return ckpt / latest["dir"]


def cmd_route(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from moe_lora.backbones import EncoderBackbone
    from moe_lora.memory.index import ExpertIndex
    from moe_lora.models import load_base

    run_dir = Path(args.run_dir)
    cfg = _run_config(run_dir)
    where = _checkpoint_dir(run_dir, "experts")
    index = ExpertIndex.load(where / "index")
    names = {int(k): v for k, v in read_json(where / "state.json")["index_names"].items()}
    base = load_base(cfg.model.name, task="encoder")
    backbone = EncoderBackbone(base.model, base.tokenizer, 0, cfg.model.max_length)
    emb = F.normalize(backbone.full_forward(args.texts), dim=-1).detach().numpy()
    ids, scores = index.search(emb, min(3, len(names)))
    for text, row, srow in zip(args.texts, ids, scores, strict=True):
        pairs = ", ".join(f"{names[int(i)]}={s:.3f}" for i, s in zip(row, srow, strict=True) if i >= 0)
        print(f"{text!r} -> {pairs}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moe_lora.bank import ExpertBank
    from moe_lora.storage import read_manifest

    run_dir = Path(args.run_dir)
    cfg = _run_config(run_dir)
    bank_dir = _checkpoint_dir(run_dir, args.family) / "bank"
    manifest = read_manifest(bank_dir)
    from moe_lora.continual import build_backbone, stream_config
    from moe_lora.data import build_stream

    backbone = build_backbone(cfg, build_stream(stream_config(cfg)))
    bank = ExpertBank.load(bank_dir, backbone.model)
    out = Path(args.out_dir)
    _export_peft(bank, args.expert, out, manifest["base"]["id"])
    print(f"expert {args.expert!r} written to {out} (PEFT adapter_config.json + adapter_model.safetensors)")
    return 0


def _export_peft(bank: object, name: str, out: Path, base_id: str) -> None:
    """Write expert ``name`` as a PEFT LoRA adapter (``base_model.model.<path>.lora_A.weight``)."""
    from moe_lora.io import atomic_save_tensors, atomic_write_json

    info = bank.info(name)  # type: ignore[attr-defined]
    params = bank.expert_parameters(name)  # type: ignore[attr-defined]
    tensors = {f"base_model.model.{k}.weight": v.detach() for k, v in params.items()}
    leaves = sorted({k.rsplit(".", 1)[0] for k in params})
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_id,
        "r": info.config.rank, "lora_alpha": info.config.alpha,
        "lora_dropout": info.config.dropout, "use_rslora": info.config.rslora,
        "target_modules": leaves, "bias": "none", "inference_mode": True,
    })


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / "manifest.json").is_file():
        from moe_lora.storage import read_manifest

        m = read_manifest(path)
        print(f"bank of base {m['base']['id']!r}: {len(m['layers'])} LoRA layers")
        for e in m["experts"]:
            print(f"  {e['name']}: task={e['task']} rank={e['config']['rank']} "
                  f"steps={e['trained_steps']}")
        return 0
    if (path / "results.json").is_file():
        from moe_lora.results import format_table

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
