"""The ``moe-lora`` command line.

::

    moe-lora continual CONFIG [key=value ...] [--profile quick] [--resume | --overwrite]
    moe-lora evaluate RUN_DIR                 # re-predict a run's checkpoints on every test set
    moe-lora route RUN_DIR TEXT [TEXT ...]    # which expert each text goes to, with weights
                   [--json]
    moe-lora export RUN_DIR EXPERT OUT_DIR    # one expert in PEFT format
    moe-lora info PATH                        # what a bank folder or a run folder holds
    moe-lora serve PATH [--port 8000 ...]     # HTTP: a run, a saved bank or an adapter store

Every command takes ``-v/--verbose``, ``-q/--quiet`` and ``--debug``. A user error (a config key,
a data file, a corrupt or missing file) prints one line ``moe-lora: error: <where>: <what>`` and
exits 2; ``--debug`` shows the traceback instead. The commands call the engine
(:mod:`moe_lora.continual`): no rule lives here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from moe_lora.continual.console import configure_console
from moe_lora.continual.settings import ConfigError, load_config
from moe_lora.core.io import CorruptFileError, read_json

__all__ = ["main"]

log = logging.getLogger("moe_lora")

USER_ERRORS = (ConfigError, FileNotFoundError, CorruptFileError, ValueError, KeyError,
               UnicodeDecodeError, OmegaConfBaseException, IsADirectoryError, PermissionError)
"""Exceptions that mean bad input: one line and exit 2, no traceback (unless --debug)."""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="Lightning's own output too")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-lora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("continual", help="run a continual-learning benchmark")
    c.add_argument("config", help="a YAML config (see configs/)")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    c.add_argument("--profile", help="a profile of the config's profiles: block, e.g. quick")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the last completed task")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run already in output.dir")
    e = sub.add_parser("evaluate", help="re-predict a run's last checkpoints on every test set")
    e.add_argument("run_dir")
    r = sub.add_parser("route", help="which experts of a run texts go to, with weights")
    r.add_argument("run_dir")
    r.add_argument("texts", nargs="+")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    x = sub.add_parser("export", help="export one expert of a run to PEFT format")
    x.add_argument("run_dir")
    x.add_argument("expert")
    x.add_argument("out_dir")
    x.add_argument("--strategy", default="experts", help="the strategy whose bank holds it")
    i = sub.add_parser("info", help="describe a bank folder or a run folder")
    i.add_argument("path")
    for command in (c, e, r, x, i):
        _common(command)
    from moe_lora.serving.cli import add_serve_parser

    _common(add_serve_parser(sub))
    return p


def cmd_continual(args: argparse.Namespace) -> int:
    """Run a benchmark (the config is validated completely before anything loads)."""
    cfg = load_config(args.config, args.overrides, args.profile)
    from moe_lora.continual.runner import is_rank_zero, run_continual

    run_continual(cfg, resume=args.resume, overwrite=args.overwrite)
    if is_rank_zero():
        log.info("results written to %s", cfg.output.dir)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Re-predict every result of a run from its checkpoints; writes evaluation.json."""
    from moe_lora.continual.results import write_evaluation
    from moe_lora.continual.saved import evaluate_run

    write_evaluation(evaluate_run(args.run_dir), Path(args.run_dir))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Print the expert weights the run's key index gives each text."""
    from moe_lora.continual.saved import open_saved

    saved = open_saved(args.run_dir, "experts")
    if saved.cfg.model.name == "mlp":
        raise ConfigError(f"{args.run_dir}: model.name=mlp takes feature vectors, not texts")
    rows = saved.route(list(args.texts))
    print(json.dumps(rows, indent=2) if args.json else _format_routes(rows))
    return 0


def _format_routes(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        c = r["chosen"]
        lines.append(f"{r['text']!r}\n  routed to {c['expert']} (task {c['task']}: {c['task_name']})")
        lines += [f"    {e['expert']:<12} task {e['task']}: {e['task_name']:<28} weight {e['weight']:.3f}"
                  for e in r["experts"]]
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    """Write one expert of a run as a PEFT LoRA folder."""
    from moe_lora.continual.saved import open_saved
    from moe_lora.interop.peft import export_peft

    saved = open_saved(args.run_dir, args.strategy)
    if args.expert not in saved.bank.names:
        raise ConfigError(f"{args.run_dir}: strategy {args.strategy!r} has no expert "
                          f"{args.expert!r}; it has {saved.bank.names}")
    out = export_peft(saved.bank, args.out_dir, args.expert,
                      base_model_name_or_path=saved.cfg.model.name)
    print(f"expert {args.expert!r} written to {out} (PEFT adapter_config.json + "
          "adapter_model.safetensors)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a bank folder or a run folder."""
    path = Path(args.path)
    if (path / "CURRENT").is_file():  # a committed folder: a bank or a strategy's checkpoint
        from moe_lora.core.commit import read_version

        with read_version(path) as where:
            if (where / "bank").is_dir():
                return _info_bank(where / "bank")
        return _info_bank(path)
    if (path / "results.json").is_file():
        from moe_lora.continual.checkpoint import checkpoint_progress
        from moe_lora.continual.results import format_table

        results = read_json(path / "results.json")
        print(f"run of {results['benchmark']}: tasks {results.get('tasks')}")
        print(format_table(results))
        for name, done in checkpoint_progress(path / "checkpoints").items():
            print(f"  checkpoint {name}: {done} step{'' if done == 1 else 's'} done")
        return 0
    raise FileNotFoundError(f"{path}: neither a bank folder (CURRENT) nor a run folder "
                            "(results.json)")


def _info_bank(path: Path) -> int:
    from moe_lora.core.storage import read_manifest

    m = read_manifest(path)
    print(f"bank of base {m['base']['id']!r}: {len(m['layers'])} LoRA layers")
    for e in m["experts"]:
        task = e["task"] + 1 if isinstance(e["task"], int) else e["task"]  # tasks count from 1
        print(f"  {e['name']}: task {task}, rank {e['config']['rank']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run, a bank or an adapter store over HTTP (see docs/serving.md)."""
    from moe_lora.serving.cli import cmd_serve as serve

    return serve(args)


HANDLERS = {"continual": cmd_continual, "evaluate": cmd_evaluate, "route": cmd_route,
            "export": cmd_export, "info": cmd_info, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``moe-lora``; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "continual" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # key=value overrides given after --profile/--resume
        args.overrides = [*args.overrides, *extra]
    configure_console(-1 if args.quiet else (1 if args.verbose else 0))
    try:
        return HANDLERS[args.command](args)
    except BrokenPipeError:  # `moe-lora info run | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"moe-lora: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
