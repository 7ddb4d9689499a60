"""A user's own continual benchmark from a JSONL or CSV file.

Each row is one example with a text, a label and a task (column names configurable) and optionally a
split (``train``/``val``/``test``). Rows without a split go to one by a hash of ``(seed, text)``, so
the assignment is deterministic and does not depend on row order.

Results must not depend on how a file happens to be sorted (a file grouped by class is common):

* inside each task and split, rows are put in a canonical order, by a hash of
  ``(seed, label, text)``, so reordering the rows of a task changes nothing downstream;
* ``order="appearance"`` (default) orders tasks by first appearance in the file, and classes by
  first appearance within their task (the file defines the stream's order);
  ``order="sorted"`` sorts task names and class names within each task (natural order: ``"2"``
  before ``"10"``), so no reordering of the file's rows changes the stream.

A class's global id is its position over the stream (task by task, in the order above).

Files are UTF-8 (a leading byte-order mark is dropped); a byte sequence that is not UTF-8 is
refused with the file, line and column. A text, label or task longer than
``FileStreamConfig.max_text_length`` characters is refused (never truncated) with the file and
line, and so is a physical line longer than ``6 * max_text_length + 64 KiB`` bytes, before it is
decoded or parsed (JSON may escape a character as six bytes), so memory stays bounded. Reading a
CSV raises the process-wide ``csv.field_size_limit`` to ``max_text_length`` if it is lower.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lora.data.stream import Split, Task, TaskStream

__all__ = ["FileStreamConfig", "ORDERS", "build_file_stream"]

_SPLITS = ("train", "val", "test")
ORDERS = ("appearance", "sorted")
"""How a file's tasks and classes are ordered (:attr:`FileStreamConfig.order`)."""


@dataclass
class FileStreamConfig:
    """A task stream read from ``path`` (``.jsonl`` or ``.csv``).

    Attributes:
        path: the data file; ``.jsonl``/``.ndjson`` (one JSON object a line) or ``.csv`` (header row).
        text_field, label_field, task_field: the required columns.
        split_field: the optional split column (``train``/``val``/``test``; empty means unset).
        seed: salts the hash split of rows without a split.
        val_fraction, test_fraction: expected shares of hash-split rows in val and test.
        max_text_length: most characters of a text, label or task (longer ones are refused).
        order: ``appearance`` or ``sorted``: how tasks and classes are ordered (module docstring).
        val_from_train: a task whose rows name train and test splits but no val gets a validation
            split carved from its training rows: per class, the ``val_fraction`` of them (rounded
            down, at least one row left for training) with the smallest hash of ``(seed, text)``.
            Statistics routers and ``ranpac`` choose their knobs on validation, never on test.

    Raises:
        ValueError: a field is empty or out of range, or the suffix is unsupported (names the field).
    """

    path: str
    text_field: str = "text"
    label_field: str = "label"
    task_field: str = "task"
    split_field: str = "split"
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_text_length: int = 100_000
    order: str = "appearance"
    val_from_train: bool = True

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"FileStreamConfig.order must be one of {list(ORDERS)}, "
                             f"got {self.order!r}")
        for name in ("path", "text_field", "label_field", "task_field", "split_field"):
            if not str(getattr(self, name)):
                raise ValueError(f"FileStreamConfig.{name} must not be empty")
        if Path(self.path).suffix.lower() not in (".jsonl", ".ndjson", ".csv"):
            raise ValueError(
                f"FileStreamConfig.path must end in .jsonl, .ndjson or .csv, got {self.path!r}"
            )
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"FileStreamConfig.{name} must be in [0, 1), got {getattr(self, name)}"
                )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("FileStreamConfig.val_fraction + test_fraction must be < 1")
        if not isinstance(self.max_text_length, int) or self.max_text_length < 1:
            raise ValueError(
                f"FileStreamConfig.max_text_length must be an int >= 1, got {self.max_text_length!r}"
            )

    @property
    def max_line_bytes(self) -> int:
        """Longest physical line read, in bytes: ``6 * max_text_length + 65536``."""
        return 6 * self.max_text_length + 65_536


@dataclass(frozen=True)
class _Row:
    text: str
    label: str
    task: str
    split: str


def _lines(path: Path, max_bytes: int) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each physical line of a UTF-8 file, newline kept, BOM dropped.

    Raises:
        ValueError: a line over ``max_bytes`` bytes (read no further), or not valid UTF-8; names
            the file and line.
    """
    with open(path, "rb") as fh:
        for lineno in itertools.count(1):
            raw = fh.readline(max_bytes + 1)
            if not raw:
                return
            if len(raw) > max_bytes:
                raise ValueError(
                    f"{path}:{lineno}: line longer than {max_bytes} bytes; raise "
                    "FileStreamConfig.max_text_length if its texts are meant to be that long"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                    f"{err.start + 1}); save the file as UTF-8"
                ) from None
            yield lineno, text.removeprefix("\ufeff") if lineno == 1 else text


def _iter_jsonl(path: Path, max_bytes: int) -> Iterator[tuple[int, dict[str, object]]]:
    for lineno, line in _lines(path, max_bytes):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _iter_csv(
    path: Path, required: list[str], cfg: FileStreamConfig
) -> Iterator[tuple[int, dict[str, object]]]:
    csv.field_size_limit(max(csv.field_size_limit(), cfg.max_text_length))
    reader = csv.DictReader(line for _, line in _lines(path, cfg.max_line_bytes))
    try:
        header = list(reader.fieldnames or [])
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} not found; columns found: {header}")
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise ValueError(
                    f"{path}:{reader.line_num}: expected {len(header)} fields as in the header {header}"
                )
            yield reader.line_num, dict(row)
    except csv.Error as err:
        raise ValueError(
            f"{path}:{reader.line_num}: {err} (FileStreamConfig.max_text_length="
            f"{cfg.max_text_length})"
        ) from None


def _row_key(row: _Row, seed: int) -> bytes:
    """The canonical position of a row within its task: a hash of its content, not its line."""
    return hashlib.sha256(f"{seed}\x00{row.label}\x00{row.text}\x00{row.split}".encode()).digest()


def _carve_val(rows: list[_Row], cfg: FileStreamConfig) -> list[_Row]:
    """``rows`` with a ``val_fraction`` of each class's training rows moved to val (see
    :attr:`FileStreamConfig.val_from_train`); the order of ``rows`` is kept."""
    moved: set[int] = set()
    for label in dict.fromkeys(r.label for r in rows):
        train = [i for i, r in enumerate(rows) if r.label == label and r.split == "train"]
        n = min(int(len(train) * cfg.val_fraction), len(train) - 1)
        train.sort(key=lambda i: _row_key(_Row(rows[i].text, "", "", ""), cfg.seed))
        moved.update(train[:n])
    return [_Row(r.text, r.label, r.task, "val") if i in moved else r for i, r in enumerate(rows)]


def _natural_sorted(names: object) -> list[str]:
    """Names sorted with digit runs compared as numbers (``"2"`` before ``"10"``)."""
    def key(name: str) -> list[tuple[int, int | str]]:
        return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]
    return sorted(names, key=key)  # type: ignore[call-overload]


def _hash_split(text: str, cfg: FileStreamConfig) -> str:
    digest = hashlib.sha256(f"{cfg.seed}:{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


def _to_row(path: Path, lineno: int, obj: dict[str, object], cfg: FileStreamConfig) -> _Row:
    fields = (cfg.text_field, cfg.label_field, cfg.task_field)
    missing = [f for f in fields if f not in obj or obj[f] is None]
    if missing:
        raise ValueError(
            f"{path}:{lineno}: column(s) {missing} missing; columns found: {sorted(obj)}"
        )
    text, label, task = (str(obj[f]).strip() for f in fields)
    for name, value in zip(fields, (text, label, task), strict=True):
        if not value:
            raise ValueError(f"{path}:{lineno}: column {name!r} is empty")
        if len(value) > cfg.max_text_length:
            raise ValueError(
                f"{path}:{lineno}: column {name!r} has {len(value)} characters, more than "
                f"FileStreamConfig.max_text_length={cfg.max_text_length}"
            )
    split = str(obj.get(cfg.split_field) or "").strip().lower()
    if split and split not in _SPLITS:
        raise ValueError(
            f"{path}:{lineno}: column {cfg.split_field!r} is {split!r}; expected one of {list(_SPLITS)}"
        )
    return _Row(text, label, task, split or _hash_split(text, cfg))


def _read_rows(cfg: FileStreamConfig) -> list[_Row]:
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found (FileStreamConfig.path)")
    required = [cfg.text_field, cfg.label_field, cfg.task_field]
    is_csv = path.suffix.lower() == ".csv"
    records = _iter_csv(path, required, cfg) if is_csv else _iter_jsonl(path, cfg.max_line_bytes)
    rows = [_to_row(path, lineno, obj, cfg) for lineno, obj in records]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def build_file_stream(cfg: FileStreamConfig) -> TaskStream:
    """Read ``cfg.path`` into a :class:`TaskStream` of text tasks with global class ids.

    Raises:
        FileNotFoundError: the file does not exist (names it).
        ValueError: a required column is missing (names the file, the column and the columns found),
            a row is malformed (names the file and line number), or a task has no train or no test
            example (names the task).
    """
    rows = _read_rows(cfg)
    arrange = _natural_sorted if cfg.order == "sorted" else list
    by_task: dict[str, list[_Row]] = {}
    for r in rows:
        by_task.setdefault(r.task, []).append(r)
    task_names = arrange(by_task)
    task_classes = {t: arrange(dict.fromkeys(r.label for r in by_task[t])) for t in task_names}
    class_names = list(dict.fromkeys(c for t in task_names for c in task_classes[t]))
    class_id = {c: i for i, c in enumerate(class_names)}
    tasks = []
    for t, task_name in enumerate(task_names):
        task_rows = sorted(by_task[task_name], key=lambda r: _row_key(r, cfg.seed))
        if cfg.val_from_train and not any(r.split == "val" for r in task_rows):
            task_rows = _carve_val(task_rows, cfg)
        classes = task_classes[task_name]
        splits = {}
        for split in _SPLITS:
            chosen = [r for r in task_rows if r.split == split]
            if not chosen and split != "val":
                raise ValueError(
                    f"{cfg.path}: task {task_name!r} has no {split} rows; add rows or a "
                    f"{cfg.split_field!r} column"
                )
            labels = torch.tensor([class_id[r.label] for r in chosen], dtype=torch.long)
            splits[split] = Split([r.text for r in chosen], labels)
        ids = [class_id[c] for c in classes]
        tasks.append(
            Task(t, task_name, classes, splits["train"], splits["val"], splits["test"], ids)
        )
    return TaskStream(tasks, class_names, f"file:{Path(cfg.path).name}")
