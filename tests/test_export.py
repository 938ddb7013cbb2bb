"""lorafit merge: merged weights reproduce base + adapter, with tokenizer, template and end tokens; never overwrite."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny_run

IDS = torch.tensor([[1, 400, 2000, 30, 7, 9000, 12, 5]])


def _adapter_logits(run, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(IDS).logits
        tuned = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(IDS).logits
    return plain, tuned


def test_merged_logits_equal_base_plus_adapter(tiny_run_dir, tiny_chat_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafit.export.merge import merge_run

    out = merge_run(tiny_run_dir, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    plain, tuned = _adapter_logits(tiny_run_dir, tiny_chat_model)
    with torch.no_grad():
        got = merged(IDS).logits
    assert (tuned - plain).abs().max() > 1e-2  # the adapter really changes the model...
    torch.testing.assert_close(got, tuned, atol=1e-4, rtol=1e-4)  # ...and the merge keeps exactly that change


def test_merged_folder_has_tokenizer_template_and_end_tokens(tiny_run_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from lorafit.export.merge import merge_run

    out = merge_run(tiny_run_dir, tmp_path / "merged", dtype="bf16")
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in generation.eos_token_id
    assert generation.pad_token_id not in generation.eos_token_id
    assert "<|im_start|>" in tokenizer.chat_template
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    prompt = json.loads((out / "lorafit_prompt.json").read_text())
    assert prompt["template"] == "model"


def test_merge_refuses_a_non_empty_out(tiny_run_dir, tmp_path):
    from lorafit.errors import RunDirError
    from lorafit.export.merge import merge_run

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        merge_run(tiny_run_dir, out)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_merge_into_an_empty_existing_folder_is_fine(tiny_run_dir, tmp_path):
    from lorafit.export.merge import merge_run

    (tmp_path / "empty").mkdir()
    out = merge_run(tiny_run_dir, tmp_path / "empty", dtype="fp32")
    assert (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".empty.tmp*"))  # no temporary folder left behind


def test_qlora_run_is_merged_into_a_full_precision_base(tiny_chat_model, tmp_path, caplog):
    """A 4-bit run needs bitsandbytes to train, but merging must not: the base is reloaded unquantized."""
    from transformers import AutoModelForCausalLM

    from lorafit.export.merge import merge_run

    run = save_tiny_run(tmp_path / "qlora", tiny_chat_model, model__quantization="4bit")
    with caplog.at_level("INFO", logger="lorafit"):
        out = merge_run(run, tmp_path / "merged", dtype="fp32")
    assert "reloaded in full precision" in caplog.text
    _, tuned = _adapter_logits(run, tiny_chat_model)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits
    torch.testing.assert_close(got, tuned, atol=1e-4, rtol=1e-4)
    assert "reloaded in full precision" in json.loads((out / "lorafit_prompt.json").read_text())["notes"][0]


def test_llama3_run_gets_the_llama31_template_and_its_three_end_tokens(tiny_llama3_model, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from lorafit.data.templates import render_llama31
    from lorafit.export.merge import merge_run

    run = save_tiny_run(tmp_path / "l3", tiny_llama3_model)
    out = merge_run(run, tmp_path / "merged", dtype="bf16")
    generation = GenerationConfig.from_pretrained(out)
    assert {128001, 128008, 128009} <= set(generation.eos_token_id)
    assert generation.pad_token_id == 128004
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_llama31(messages, add_generation_prompt=True)


def test_bad_dtype_and_missing_run_are_clear_errors(tmp_path):
    from lorafit.errors import ConfigError, RunDirError
    from lorafit.export.merge import merge_run

    with pytest.raises(ConfigError, match="--dtype"):
        merge_run(tmp_path, tmp_path / "out", dtype="int4")
    with pytest.raises(RunDirError, match="not a lorafit run directory"):
        merge_run(tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize(
    "model_fixture, template, end_tokens",
    [
        ("tiny_chat_model", "model", {"<|im_end|>", "<|endoftext|>"}),
        ("tiny_llama3_model", "llama3", {"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"}),
    ],
)
def test_a_trained_runs_tokenizer_folder_stands_alone(request, tmp_path, model_fixture, template, end_tokens):
    """runs/<name>/tokenizer loads with plain AutoTokenizer (chat template inside, even for the built-in Llama 3.1
    format) and GenerationConfig (eos = every end token), so other tools render and stop as training did."""
    from helpers import tiny_config
    from transformers import AutoTokenizer, GenerationConfig

    from lorafit.config import load_config
    from lorafit.data.templates import encode_prompt
    from lorafit.models.tokenizer import load_tokenizer
    from lorafit.train.run import run_training

    model_dir = request.getfixturevalue(model_fixture)
    cfg = load_config(tiny_config(tmp_path, model_dir, training={"max_steps": 1}))
    run = run_training(cfg, quiet=True)
    folder = run / "tokenizer"
    plain = AutoTokenizer.from_pretrained(folder)
    generation = GenerationConfig.from_pretrained(folder)
    assert {plain.convert_ids_to_tokens(i) for i in generation.eos_token_id} == end_tokens
    assert generation.pad_token_id not in generation.eos_token_id
    trained = load_tokenizer(str(model_dir))  # what training rendered with
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Quillmoor?"}]
    ids = plain.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == encode_prompt(trained, messages, template)
