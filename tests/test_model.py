"""Model loading: the embedded model, pad tokens, parameter counts and actionable errors."""

import pytest

from lorafit.data.special_tokens import end_token_ids
from lorafit.errors import ModelError
from lorafit.models.lora import count_parameters, describe_parameters
from lorafit.models.sources import hub_error as _hub_errors
from lorafit.models.sources import resolve_model


def test_embedded_model_is_cached_as_safetensors(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").exists()
    assert resolve_model("smollm2-135m-instruct") == str(smollm2_dir)  # second call uses the cache


def test_pad_token_is_never_an_end_token(smollm2_tokenizer):
    ends = end_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in ends
    assert smollm2_tokenizer.pad_token_id is not None and smollm2_tokenizer.pad_token_id not in ends


def test_llama3_pad_is_finetune_right_pad(llama3_tokenizer):
    assert llama3_tokenizer.pad_token_id == 128004
    assert 128009 in end_token_ids(llama3_tokenizer)


def test_unknown_model_names(tmp_path):
    with pytest.raises(ModelError, match="neither an existing folder nor a Hub id"):
        resolve_model("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


def test_gated_and_too_old_errors_say_what_to_do():
    gated = _hub_errors(
        "meta-llama/Llama-3.1-8B-Instruct", OSError("You are trying to access a gated repo. 401 Client Error")
    )
    assert "hf auth login" in gated.hint and "HF_TOKEN" in gated.hint
    old = _hub_errors(
        "x/y",
        ValueError(
            "The checkpoint you are trying to load has model type `llama9` but Transformers does not recognize this architecture."
        ),
    )
    assert "pip install -U" in old.hint
    leaked = _hub_errors("x/y", RuntimeError("token hf_abcdefghijklmnopqrstuvwxyz rejected"))
    assert "hf_abcdefghij" not in str(leaked)


def test_lora_parameter_counts_match_the_arithmetic(tiny_chat_model):
    from lorafit.config import LoraSection, ModelSection
    from lorafit.models.lora import attach_lora
    from lorafit.models.sources import load_base_model

    model = load_base_model(ModelSection(name=str(tiny_chat_model)))
    _, base_total = count_parameters(model)
    peft_model = attach_lora(model, LoraSection(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = count_parameters(peft_model)
    # q_proj: 64->64, v_proj: 64->32 (2 KV heads × 16), 2 layers; LoRA adds r*(in+out) per module
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert trainable == expected and total == base_total + expected
    assert describe_parameters(trainable, total).startswith(f"trainable {expected:,} / ")
