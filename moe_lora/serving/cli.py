"""``moe-lora serve PATH``: the subcommand's parser and its entry point (wired by moe_lora.cli)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from moe_lora.serving.config import ServeConfig

__all__ = ["add_serve_parser", "cmd_serve"]

_HELP = {
    "host": "interface to bind (default 127.0.0.1, loopback only; 0.0.0.0 exposes the server)",
    "port": "TCP port", "max_batch_size": "requests per forward (1: no batching)",
    "batch_timeout": "seconds a worker waits to fill a batch",
    "workers": "inference workers per device (each loads the model)",
    "device": "cpu, cuda or auto", "threads": "torch threads per worker",
    "timeout": "seconds a request may wait in the queue (then 504)",
    "max_text_chars": "longest accepted text (413 beyond)",
    "max_input_tokens": "longest accepted input in tokens (413 beyond)",
    "max_new_tokens": "largest max_tokens of a completion", "max_choices": "largest n",
    "max_resident": "store experts resident at once (an adapter store folder)",
    "max_resident_bytes": "bytes of store experts resident at once",
    "base": "base model name or folder, overriding the manifest's base id",
    "result": "a continual run's task-agnostic result answering \"auto\" (default: its best)",
}


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to a ``moe-lora`` subparsers object; returns its parser."""
    p = subparsers.add_parser("serve", help="serve a saved bank or adapter store over HTTP",
                              description="Serve a saved bank (manifest.json) or an adapter "
                                          "store (store.json) with LitServe; see docs/serving.md.")
    p.add_argument("path", help="a saved bank folder or an adapter store folder")
    for f in fields(ServeConfig):
        kind = {"int | None": int, "str | None": str}.get(str(f.type), None)
        kind = kind or {"int": int, "float": float, "str": str}[str(f.type)]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                       help=f"{_HELP[f.name]} (default: {f.default})")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``moe-lora serve``; returns the exit status (2 for a bad folder or flag)."""
    from moe_lora.serving.server import serve

    try:
        config = ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})
        serve(args.path, config, log_level=args.log_level)
    except (ValueError, FileNotFoundError) as err:
        print(f"moe-lora serve: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_lora.serving.cli PATH ...`` (the same as ``moe-lora serve``)."""
    parser = argparse.ArgumentParser(prog="moe-lora")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_serve(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
