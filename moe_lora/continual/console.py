"""What a run prints: one line per event, one overall progress bar, nothing twice.

:func:`configure_console` sets the ``moe_lora`` logger (its own handler, no propagation, so no
line is printed twice), quiets Lightning's and FAISS's start-up notices and framework tips unless
``verbose``, and hides warnings that only concern Lightning's defaults. :class:`RunProgress` is the
run's one progress bar: a unit per training epoch and per evaluation of every strategy's every
task, with the strategy, task ``k/n``, epoch and ETA in its description.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import lightning as L
from tqdm.auto import tqdm

__all__ = ["EpochTicker", "RunProgress", "configure_console"]

log = logging.getLogger("moe_lora")

_NOISY = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
          "faiss", "faiss.loader")


def configure_console(verbosity: int = 0) -> None:
    """Console set-up for a command: ``verbosity`` -1 quiet, 0 default, 1 verbose.

    Default: ``moe_lora`` INFO lines, Lightning and FAISS at WARNING, Lightning's tips and
    default-setting warnings hidden. Quiet: warnings and errors only. Verbose: everything.
    """
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
    if verbosity <= 0:
        _quiet_transformers()
        for module in ("lightning", "pytorch_lightning", "torch.utils.data"):
            warnings.filterwarnings("ignore", module=module)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*in eval mode at the start of training.*")


def _quiet_transformers() -> None:
    """No "Loading weights" bars and no info lines from transformers / sentence-transformers."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class RunProgress:
    """The run's overall progress bar (disabled when ``enabled`` is False or on ranks > 0).

    Args:
        total: units of work (epochs + evaluations over every strategy and task).
        enabled: show it.
    """

    def __init__(self, total: int, enabled: bool = True):
        self.bar = tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True,
                        leave=False, file=sys.stderr,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        self.where = ""

    def at(self, strategy: str, task: int, n_tasks: int, what: str = "") -> None:
        """Show that ``strategy`` works on task ``task`` (1-based) of ``n_tasks``."""
        self.where = f"{strategy} task {task}/{n_tasks}"
        self.bar.set_description_str(f"{self.where} {what}".rstrip(), refresh=True)

    def detail(self, what: str) -> None:
        """Show ``what`` (an epoch, evaluation) after the current place."""
        self.bar.set_description_str(f"{self.where} {what}", refresh=True)

    def advance(self, n: int = 1) -> None:
        """``n`` units done."""
        self.bar.update(n)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (an event)."""
        if self.bar.disable:
            log.info(line)
        else:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


class EpochTicker(L.Callback):
    """Advances :class:`RunProgress` by one unit per training epoch of a fit."""

    def __init__(self, progress: RunProgress, epochs: int):
        self.progress, self.epochs = progress, epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.progress.detail(f"epoch {trainer.current_epoch + 1}/{self.epochs}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.progress.advance()
