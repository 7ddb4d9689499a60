"""Data: WordNet glosses, the Split-WordNet / Split-Digits streams and users' JSONL/CSV files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from moe_lora.data import (
    DigitsStreamConfig,
    FileStreamConfig,
    Split,
    Task,
    TaskStream,
    WordNetStreamConfig,
    build_stream,
    load_glosses,
)

SMALL_WN = WordNetStreamConfig(
    n_tasks=3, classes_per_task=4, train_per_class=20, val_per_class=5, test_per_class=10
)


def test_wordnet_counts_and_format() -> None:
    glosses = load_glosses()
    counts = Counter(g.lexname for g in glosses)
    assert len(glosses) == 117659
    assert len(counts) == 45
    assert Counter(g.pos for g in glosses) == {
        "n": 82115,
        "v": 13767,
        "a": 7463,
        "s": 10693,
        "r": 3621,
    }
    assert counts["noun.animal"] == 7509 and counts["verb.weather"] == 81
    first = glosses[0]
    assert (first.text, first.lexname, first.offset) == (
        "entity: that which is perceived or known or inferred to have its own distinct existence "
        "(living or nonliving)",
        "noun.Tops",
        1740,
    )
    assert all("_" not in g.text.split(": ", 1)[0] for g in glosses)


def test_wordnet_stream_deterministic_and_disjoint() -> None:
    a, b = build_stream(SMALL_WN), build_stream(SMALL_WN)
    assert a.class_names == b.class_names and len(a.class_names) == 12
    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        assert ta.train.inputs == tb.train.inputs and torch.equal(ta.test.labels, tb.test.labels)
    seen: set[str] = set()
    for task in a:
        parts = [set(task.train.inputs), set(task.val.inputs), set(task.test.inputs)]
        assert [len(p) for p in parts] == [80, 20, 40]  # per split, no duplicates inside
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert not seen & set().union(*parts)
        seen |= set().union(*parts)
        assert Counter(task.test.labels.tolist()) == {c: 10 for c in task.class_ids}
    other = build_stream(WordNetStreamConfig(**{**SMALL_WN.__dict__, "seed": 1}))
    assert other.class_names != a.class_names


def test_wordnet_stream_labels_match_texts() -> None:
    stream = build_stream(SMALL_WN)
    lexname = {g.text: g.lexname for g in load_glosses()}
    task = stream[1]
    for text, label in zip(task.train.inputs, task.train.labels.tolist(), strict=True):
        assert stream.class_names[label] == lexname[text]
    assert all(Counter(g.lexname for g in load_glosses())[c] >= 500 for c in stream.class_names)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_tasks": 0}, "n_tasks"),
        ({"train_per_class": 600}, "min_count"),
        ({"val_per_class": -1}, "val_per_class"),
    ],
)
def test_wordnet_config_validation(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        WordNetStreamConfig(**kwargs)


def test_wordnet_stream_too_many_classes() -> None:
    with pytest.raises(ValueError, match="min_count=500"):
        build_stream(WordNetStreamConfig(n_tasks=10, classes_per_task=5))


def test_digits_stream() -> None:
    stream = build_stream(DigitsStreamConfig())
    assert stream.benchmark == "split-digits" and len(stream) == 5 and stream.n_classes == 10
    total = 0
    for t, task in enumerate(stream):
        assert task.class_ids == [2 * t, 2 * t + 1]
        x = task.train.inputs
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape[1] == 64
        assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
        assert set(task.test.labels.tolist()) == set(task.class_ids)
        assert task.to_local(task.test.labels).max() == 1
        total += len(task.train) + len(task.val) + len(task.test)
    assert total == 1797
    again = build_stream(DigitsStreamConfig())
    assert torch.equal(again[2].test.inputs, stream[2].test.inputs)  # type: ignore[arg-type]


def test_local_global_mapping_and_seen_classes() -> None:
    stream = build_stream(DigitsStreamConfig(shuffle_classes=True, seed=3))
    task = stream[3]
    labels = task.test.labels
    assert torch.equal(task.to_global(task.to_local(labels)), labels)
    assert stream.seen_class_ids(1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not among"):
        task.to_local(torch.tensor([0]))
    assert len(stream.joint_task().test) == sum(len(t.test) for t in stream)


def test_stream_rejects_foreign_labels() -> None:
    split = Split(["a", "b"], torch.tensor([0, 1]))
    bad = Task(0, "t", ["x"], split, split, split)
    with pytest.raises(ValueError, match="outside its classes"):
        TaskStream([bad], ["x", "y"], "toy")


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _toy_rows(n: int = 60) -> list[dict[str, object]]:
    return [
        {
            "text": f"example {i}",
            "label": ["pos", "neg", "odd", "even"][i % 4],
            "task": f"t{i % 4 // 2}",
        }
        for i in range(n)
    ]


def test_file_stream_jsonl_hash_split(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", _toy_rows())
    stream = build_stream(FileStreamConfig(str(path)))
    assert [t.name for t in stream] == ["t0", "t1"]
    assert stream.class_names == ["pos", "neg", "odd", "even"]
    assert stream[1].class_ids == [2, 3]
    texts = [set(getattr(t, s).inputs) for t in stream for s in ("train", "val", "test")]
    assert sum(len(x) for x in texts) == 60 and len(set().union(*texts)) == 60
    shuffled = _write_jsonl(tmp_path / "e.jsonl", list(reversed(_toy_rows())))
    again = build_stream(FileStreamConfig(str(shuffled)))
    assert [t.name for t in again] == ["t1", "t0"]  # tasks in order of first appearance
    assert set(again[1].test.inputs) == set(stream[0].test.inputs)  # the split ignores row order


def test_file_stream_csv_with_split_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    lines = ["text,label,task,split"]
    lines += [
        f"row {i},{'ab'[i % 2]},{i // 4},{['train', 'test', 'train', 'test'][i % 4]}"
        for i in range(8)
    ]
    path.write_text("\n".join(lines) + "\n")
    stream = build_stream(FileStreamConfig(str(path)))
    assert len(stream) == 2 and len(stream[0].train) == 2 and len(stream[0].val) == 0
    assert sorted(stream[1].test.inputs) == ["row 5", "row 7"]


def test_file_stream_does_not_depend_on_the_files_row_order(tmp_path: Path) -> None:
    """Rows within a task come in a canonical order (a hash of their content), and
    ``order="sorted"`` sorts tasks and classes naturally: a shuffled or class-grouped copy of a
    file gives the identical stream, split by split, row by row."""
    import random

    rows = [{"text": f"text {i}", "label": f"c{i % 3 + 3 * (i // 30)}", "task": str(10 - i // 30),
             "split": ["train", "val", "test"][i % 3 if i % 5 else 0]} for i in range(90)]
    grouped = sorted(rows, key=lambda r: (r["label"], r["text"]))
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)

    def stream_of(name: str, data: list[dict[str, str]], order: str):
        return build_stream(FileStreamConfig(str(_write_jsonl(tmp_path / name, data)), order=order))

    def content(s):
        return ([t.name for t in s], s.class_names, [t.class_ids for t in s],
                [(list(getattr(t, sp).inputs), [s.class_names[c] for c in getattr(t, sp).labels])
                 for t in s for sp in ("train", "val", "test")])

    ref = content(stream_of("a.jsonl", rows, "sorted"))
    assert ref[0] == ["8", "9", "10"]  # natural order, not the file's 10, 9, 8
    assert content(stream_of("b.jsonl", grouped, "sorted")) == ref
    assert content(stream_of("c.jsonl", shuffled, "sorted")) == ref
    # by appearance, the file orders tasks and classes; rows inside a task still do not matter
    appearance = content(stream_of("d.jsonl", rows, "appearance"))
    assert appearance[0] == ["10", "9", "8"]
    within = [r for t in ("10", "9", "8") for r in shuffled if r["task"] == t]
    again = content(stream_of("e.jsonl", within, "appearance"))
    assert again[3] == appearance[3] and sorted(again[1]) == sorted(appearance[1])
    with pytest.raises(ValueError, match="FileStreamConfig.order"):
        FileStreamConfig(str(tmp_path / "a.jsonl"), order="random")


def test_file_stream_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_stream(FileStreamConfig(str(missing)))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,label,task\nhi,a,0\n")
    with pytest.raises(
        ValueError, match=r"d\.csv.*'text'.*columns found: \['sentence', 'label', 'task'\]"
    ):
        build_stream(FileStreamConfig(str(csv_path)))
    rows = _toy_rows(6)
    rows[4] = {"text": "x", "task": "t0"}
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl:5: column\(s\) \['label'\] missing"):
        build_stream(FileStreamConfig(str(path)))
    path.write_text('{"text": "a", "label": "x", "task": "0"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        build_stream(FileStreamConfig(str(path)))
    path.write_text('{"text": "a", "label": "x", "task": "0", "split": "dev"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: column 'split' is 'dev'"):
        build_stream(FileStreamConfig(str(path)))
    csv_path.write_text("text,label,task\nhi,a,0\nhello,b\n")
    with pytest.raises(ValueError, match=r"d\.csv:3: expected 3 fields"):
        build_stream(FileStreamConfig(str(csv_path)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": "d.txt"}, "path"),
        ({"path": "d.csv", "test_fraction": 1.5}, "test_fraction"),
        ({"path": "d.csv", "text_field": ""}, "text_field"),
    ],
)
def test_file_config_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FileStreamConfig(**kwargs)  # type: ignore[arg-type]


def test_build_stream_rejects_unknown_config() -> None:
    with pytest.raises(TypeError, match="unsupported config"):
        build_stream(object())  # type: ignore[arg-type]


def _csv_text(rows: list[dict[str, object]]) -> str:
    return "text,label,task\n" + "".join(f"{r['text']},{r['label']},{r['task']}\n" for r in rows)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_file_stream_names_file_line_and_column_of_bad_utf8(tmp_path: Path, suffix: str) -> None:
    rows = _toy_rows(8)
    text = _csv_text(rows) if suffix == "csv" else "".join(json.dumps(r) + "\n" for r in rows)
    data = text.encode().replace(b"example 3", b"exam\xe9le 3")  # Latin-1, not UTF-8
    path = tmp_path / f"d.{suffix}"
    path.write_bytes(data)
    line = 5 if suffix == "csv" else 4
    with pytest.raises(ValueError, match=rf"d\.{suffix}:{line}: not valid UTF-8 \(byte 0xe9 at column"):
        build_stream(FileStreamConfig(str(path)))


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_file_stream_accepts_a_utf8_bom(tmp_path: Path, suffix: str) -> None:
    rows = _toy_rows()
    text = _csv_text(rows) if suffix == "csv" else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / f"d.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    stream = build_stream(FileStreamConfig(str(path)))
    assert sum(len(t.train) + len(t.val) + len(t.test) for t in stream) == 60


def test_file_stream_long_csv_fields_work_up_to_the_maximum(tmp_path: Path) -> None:
    rows = _toy_rows()
    rows[0]["text"] = "w" * 150_000  # over the csv module's default 128 KiB field limit
    path = tmp_path / "d.csv"
    path.write_text(_csv_text(rows))
    stream = build_stream(FileStreamConfig(str(path), max_text_length=200_000))
    assert max(len(x) for t in stream for x in t.train.inputs + t.test.inputs + t.val.inputs) \
        == 150_000
    with pytest.raises(ValueError, match=r"d\.csv:2: .*max_text_length=100000"):
        build_stream(FileStreamConfig(str(path), max_text_length=100_000))


def test_file_stream_refuses_texts_over_the_maximum(tmp_path: Path) -> None:
    rows = _toy_rows()
    rows[2]["text"] = "w" * 101
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"d\.jsonl:3: column 'text' has 101 characters, more "
                                         r"than FileStreamConfig\.max_text_length=100"):
        build_stream(FileStreamConfig(str(path), max_text_length=100))


def test_a_huge_jsonl_line_is_refused_before_it_is_read_whole(tmp_path: Path) -> None:
    import tracemalloc

    rows = _toy_rows()
    rows[1]["text"] = "w" * 20_000_000
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"d\.jsonl:2: line longer than 71536 bytes"):
            build_stream(FileStreamConfig(str(path), max_text_length=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak


def test_a_task_without_val_rows_gets_validation_carved_from_train(tmp_path: Path) -> None:
    """Train/test-only files: 10 % of each class's training rows become validation (rounded down,
    chosen by a hash of the text, so the file's order does not matter); opt out with
    ``val_from_train=False``."""
    rows = [{"text": f"{c} {i}", "label": c, "task": "t", "split": "train"}
            for c in ("a", "b") for i in range(25)]
    rows += [{"text": f"{c} test {i}", "label": c, "task": "t", "split": "test"}
             for c in ("a", "b") for i in range(3)]
    path = _write_jsonl(tmp_path / "tt.jsonl", rows)
    task = build_stream(FileStreamConfig(str(path)))[0]
    val, train = list(task.val.inputs), list(task.train.inputs)
    assert len(val) == 4 and len(train) == 46 and not set(val) & set(train)
    assert sorted(t.split()[0] for t in val) == ["a", "a", "b", "b"]  # 2 per class of 25
    reordered = _write_jsonl(tmp_path / "rev.jsonl", list(reversed(rows)))
    assert set(build_stream(FileStreamConfig(str(reordered)))[0].val.inputs) == set(val)
    kept = build_stream(FileStreamConfig(str(path), val_from_train=False))[0]
    assert len(kept.val) == 0 and len(kept.train) == 50
