"""Shared fixtures: tiny random Llama models and real tokenizers, all offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One torch thread per xdist worker (set before torch loads, inherited by the CLI subprocesses): two workers with
# two threads each on this project's 2-core machines spin-wait for each other, and trained ~7x slower in CI.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import save_tiny_llama, save_tiny_run  # noqa: E402 - after the thread setting: it imports torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = Path(
    os.environ.get("LORAFIT_LLAMA3_TOKENIZER", ROOT.parent / "shared" / "llama3" / "tokenizer.model")
)

# Every cache a test run writes stays inside the project (ignored by git), never in the user's home: converted
# models and tokenizers persist across runs in .cache/test-cache; Arrow files get a fresh folder per session.
os.environ["LORAFIT_CACHE"] = str(ROOT / ".cache" / "test-cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_cache(tmp_path_factory):
    """Arrow files written by the tests go to a temporary folder, not the user's lorafit cache."""
    old = os.environ.get("LORAFIT_DATA_CACHE")
    os.environ["LORAFIT_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    yield
    if old is None:
        os.environ.pop("LORAFIT_DATA_CACHE", None)
    else:
        os.environ["LORAFIT_DATA_CACHE"] = old


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once to safetensors (~40 s the first time)."""
    from lorafit.models.sources import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from lorafit.models.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    if not LLAMA3_TOKENIZER.exists():
        pytest.skip(f"the Llama 3 tokenizer is not at {LLAMA3_TOKENIZER} (set LORAFIT_LLAMA3_TOKENIZER)")
    from lorafit.models.tokenizer import load_llama3_tokenizer

    tok = load_llama3_tokenizer(LLAMA3_TOKENIZER)
    from lorafit.models.tokenizer import ensure_pad_token

    ensure_pad_token(tok)
    return tok


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Tiny random Llama with SmolLM2's tokenizer and chat template (ChatML, <|im_end|>)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_chat"), smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama3_model(tmp_path_factory, llama3_tokenizer) -> Path:
    """Tiny random Llama with the real Llama 3 tokenizer (no chat template: the built-in Llama 3.1 format is used)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama3"), llama3_tokenizer)


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, tiny_chat_model) -> Path:
    """A run directory on the tiny SmolLM2-tokenizer model (ChatML template, <|im_end|>)."""
    return save_tiny_run(tmp_path_factory.mktemp("runs") / "tiny", tiny_chat_model)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_run_dir, tmp_path_factory) -> Path:
    """`tiny_run_dir` exported to an f16 GGUF (reading a 49k-token vocabulary back is slow: export it once)."""
    from lorafit.export.gguf import export_gguf

    return export_gguf(tiny_run_dir, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", outtype="f16")


def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup`: every test that serves the shared demo run on one worker (the others would wait on
    its file lock while it trains), and the two other real-model demos together on another, so the three longest
    trainings never queue behind each other on one worker."""
    for item in items:
        if "served" in getattr(item, "fixturenames", ()) or item.name == "test_the_real_demo_meets_its_documented_bar":
            item.add_marker(pytest.mark.xdist_group("served-demo"))
        elif item.name in ("test_tool_demo_meets_its_bar", "test_dpo_demo_meets_its_bar"):
            item.add_marker(pytest.mark.xdist_group("other-demos"))
