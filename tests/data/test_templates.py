"""The built-in Llama 3.1 format matches the official Instruct template; the model's own template is used when it has one."""

from __future__ import annotations

import pytest
from helpers import MULTI_TURN, chat_template

from lorafit.data.templates import (
    LLAMA31_CHAT_TEMPLATE,
    encode_prompt,
    end_of_turn_ids,
    render,
    render_llama31,
    render_prompt,
    resolve_template,
)
from lorafit.errors import DataError

HEADER = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def test_llama31_exact_text_without_and_with_system():
    messages = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello!\n"}]
    assert render_llama31(messages) == (
        HEADER + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    )
    with_system = [{"role": "system", "content": " Be brief. "}] + messages[:1]
    assert render_llama31(with_system, add_generation_prompt=True) == (
        HEADER + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_jinja_template_renders_the_same(llama3_tokenizer):
    with chat_template(llama3_tokenizer, LLAMA31_CHAT_TEMPLATE) as tok:
        for messages in (MULTI_TURN, MULTI_TURN[1:3], MULTI_TURN[:2]):
            for gen in (False, True):
                assert render(tok, messages, "model", gen) == render_llama31(messages, add_generation_prompt=gen)


def test_resolve_template(llama3_tokenizer, smollm2_tokenizer):
    assert resolve_template(llama3_tokenizer, "auto") == "llama3"
    assert resolve_template(smollm2_tokenizer, "auto") == "model"
    assert resolve_template(smollm2_tokenizer, "model") == "model"
    with pytest.raises(DataError, match="no chat template"):
        resolve_template(llama3_tokenizer, "model")
    with pytest.raises(DataError, match="Llama 3 special tokens"):
        resolve_template(smollm2_tokenizer, "llama3")


def test_end_of_turn_ids(llama3_tokenizer, smollm2_tokenizer):
    assert end_of_turn_ids(llama3_tokenizer, "llama3")[0] == 128009
    assert set(end_of_turn_ids(llama3_tokenizer, "llama3")) == {128001, 128008, 128009}
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(smollm2_tokenizer, "model")[0] == im_end
    assert end_of_turn_ids(smollm2_tokenizer, "auto")[0] == im_end


def test_prompt_ends_with_generation_prompt_and_has_one_bos(llama3_tokenizer, smollm2_tokenizer):
    messages = MULTI_TURN[:2]
    assert render_prompt(llama3_tokenizer, messages, "llama3").endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = encode_prompt(llama3_tokenizer, messages, "llama3")
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert render_prompt(smollm2_tokenizer, messages, "model").endswith("<|im_start|>assistant\n")
    assert (
        encode_prompt(smollm2_tokenizer, messages, "auto")
        == smollm2_tokenizer(render_prompt(smollm2_tokenizer, messages, "model"), add_special_tokens=False)["input_ids"]
    )
