"""Continual-learning data: task streams built from WordNet, scikit-learn digits or a user's file.

Every builder returns a :class:`TaskStream` whose labels are global class ids.
"""

from moe_lora.data.build import StreamConfig, build_stream
from moe_lora.data.digits import DigitsStreamConfig, build_digits_stream
from moe_lora.data.files import FileStreamConfig, build_file_stream
from moe_lora.data.stream import Split, Task, TaskStream
from moe_lora.data.wordnet import (
    Gloss,
    WordNetStreamConfig,
    build_wordnet_stream,
    load_glosses,
    wordnet_dir,
)

__all__ = [
    "DigitsStreamConfig",
    "FileStreamConfig",
    "Gloss",
    "Split",
    "StreamConfig",
    "Task",
    "TaskStream",
    "WordNetStreamConfig",
    "build_digits_stream",
    "build_file_stream",
    "build_stream",
    "build_wordnet_stream",
    "load_glosses",
    "wordnet_dir",
]
