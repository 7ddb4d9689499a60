"""The dynamic-retrieval example runs end to end in its fast mode and retrieves far above chance."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dynamic_retrieval.py"


@pytest.mark.slow
def test_dynamic_retrieval_example_fast():
    spec = importlib.util.spec_from_file_location("dynamic_retrieval", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--fast"])
    assert result["queries"] == 72
    assert result["retrieval_accuracy"] > 0.6  # 4 experts: chance is 0.25
    assert result["store_misses"] >= 4 and result["store_evictions"] >= 2  # at most 2 resident
