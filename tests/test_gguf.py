"""GGUF export: transformers' GGUF loader reads our file back to the same model and the same tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

IDS = torch.tensor([[1, 400, 2000, 30, 7, 9000, 12, 5]])
TEXTS = [
    "Hello world",
    "Hello world! 1234567 don't  spaces\ttab\n\n\nünïcödé 😀",
    "<|im_start|>user\nWhat's up?<|im_end|>\n",
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
]


@pytest.fixture(scope="module")
def merged(tiny_run_dir, tmp_path_factory):
    from lorafit.export.merge import merge_run

    return merge_run(tiny_run_dir, tmp_path_factory.mktemp("m") / "merged", dtype="fp32")


def _logits_from_gguf(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def _merged_logits(folder):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(IDS).logits


def test_f16_gguf_gives_the_merged_models_logits(tiny_gguf, merged):
    want = _merged_logits(merged)
    got = _logits_from_gguf(tiny_gguf)
    scale = want.abs().max()
    assert (got - want).abs().max() < 5e-3 * scale  # only f16 rounding separates them
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_q8_0_gguf_from_a_merged_folder(merged, tiny_gguf, tmp_path):
    from lorafit.export.gguf import export_gguf

    q8 = export_gguf(merged, tmp_path / "a-q8.gguf", outtype="q8_0")
    want = _merged_logits(merged)
    q8_logits = _logits_from_gguf(q8)
    assert q8.stat().st_size < 0.6 * tiny_gguf.stat().st_size  # 8.5 bits per weight instead of 16
    assert (q8_logits - want).abs().max() < 0.05 * want.abs().max()


def test_gguf_tokenizer_metadata_round_trips(tiny_run_dir, tiny_gguf):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    out = tiny_gguf
    original = AutoTokenizer.from_pretrained(tiny_run_dir / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    for text in TEXTS[:3]:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text
    assert loaded.chat_template == original.chat_template
    assert loaded.eos_token == "<|im_end|>"  # llama.cpp / Ollama stop on eos: it must end a turn
    fields = GGUFReader(out).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_llama3_tokenizer_metadata_rebuilds_the_same_tokenizer(llama3_tokenizer):
    """The Llama 3 (tiktoken-derived) vocabulary as llama.cpp's `llama-bpe`, rebuilt by transformers' GGUF code."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
    )

    from lorafit.data.templates import end_of_turn_ids
    from lorafit.export.gguf import tokenizer_metadata

    meta = tokenizer_metadata(llama3_tokenizer, 128256, end_of_turn_ids(llama3_tokenizer, "llama3"))
    assert meta["pre"] == "llama-bpe" and meta["add_bos_token"] is True
    assert meta["eos_token_id"] == 128009 and meta["eom_token_id"] == 128008 and meta["padding_token_id"] == 128004
    assert meta["token_type"][128009] == 3 and meta["token_type"][9906] == 1  # control vs normal
    backend, _ = convert_gguf_tokenizer(
        "llama",
        {
            "tokenizer_type": meta["model"],
            "pre_tokenizer_type": meta["pre"],
            "tokens": meta["tokens"],
            "token_type": meta["token_type"],
            "merges": meta["merges"],
        },
    )
    for text in TEXTS:
        assert (
            backend.encode(text, add_special_tokens=False).ids
            == llama3_tokenizer(text, add_special_tokens=False)["input_ids"]
        ), text


def test_permutation_is_what_transformers_gguf_loader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from lorafit.export.gguf import permute_for_rope

    rng = np.random.default_rng(0)
    q = rng.standard_normal((32, 16)).astype(np.float32)  # 4 heads of dim 8
    k = rng.standard_normal((16, 16)).astype(np.float32)  # 2 kv heads
    undo = LlamaTensorProcessor()._reverse_permute_weights
    assert not np.array_equal(permute_for_rope(q, 4, 4), q)
    np.testing.assert_array_equal(undo(permute_for_rope(q, 4, 4), 4, 4), q)
    np.testing.assert_array_equal(undo(permute_for_rope(k, 4, 2), 4, 2), k)


def test_llama31_rope_scaling_becomes_rope_freqs():
    from transformers import LlamaConfig

    from lorafit.export.gguf import llama3_rope_factors

    cfg = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    factors = llama3_rope_factors(cfg)
    assert len(factors) == 64  # one per rotated pair of the 128-dim head
    assert factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies kept, low ones stretched by the factor
    assert all(a <= b for a, b in zip(factors, factors[1:]))
    assert llama3_rope_factors(LlamaConfig()) is None


def test_refusals(tiny_run_dir, tmp_path):
    from lorafit.errors import ConfigError, ModelError, RunDirError
    from lorafit.export.gguf import export_gguf

    taken = tmp_path / "x.gguf"
    taken.write_bytes(b"mine")
    with pytest.raises(RunDirError, match="already exists"):
        export_gguf(tiny_run_dir, taken)
    assert taken.read_bytes() == b"mine"
    with pytest.raises(ConfigError, match="outtype"):
        export_gguf(tiny_run_dir, tmp_path / "y.gguf", outtype="q4_k")
    with pytest.raises(ModelError, match="neither a run directory"):
        export_gguf(tmp_path, tmp_path / "z.gguf")
