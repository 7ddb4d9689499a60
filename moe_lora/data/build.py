"""One entry point from a stream config to a :class:`~moe_lora.data.stream.TaskStream`."""

from __future__ import annotations

from typing import Union

from moe_lora.data.digits import DigitsStreamConfig, build_digits_stream
from moe_lora.data.files import FileStreamConfig, build_file_stream
from moe_lora.data.stream import TaskStream
from moe_lora.data.wordnet import WordNetStreamConfig, build_wordnet_stream

__all__ = ["StreamConfig", "build_stream"]

StreamConfig = Union[WordNetStreamConfig, DigitsStreamConfig, FileStreamConfig]  # noqa: UP007


def build_stream(cfg: StreamConfig) -> TaskStream:
    """Build the stream a config describes (dispatch on the config's type).

    Raises:
        TypeError: ``cfg`` is not one of the stream configs.
    """
    if isinstance(cfg, WordNetStreamConfig):
        return build_wordnet_stream(cfg)
    if isinstance(cfg, DigitsStreamConfig):
        return build_digits_stream(cfg)
    if isinstance(cfg, FileStreamConfig):
        return build_file_stream(cfg)
    raise TypeError(
        f"build_stream: unsupported config {type(cfg).__name__}; expected WordNetStreamConfig, "
        "DigitsStreamConfig or FileStreamConfig"
    )
