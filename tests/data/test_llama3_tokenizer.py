"""The Llama 3 tokenizer built from Meta's tiktoken file has the ids every Llama 3 checkpoint was trained with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorafit.errors import ModelError
from lorafit.models.tokenizer import KNOWN_IDS, SPECIAL_TOKENS, load_llama3_tokenizer

LLAMA3_TOKENIZER = Path(
    os.environ.get(
        "LORAFIT_LLAMA3_TOKENIZER", Path(__file__).resolve().parents[3] / "shared" / "llama3" / "tokenizer.model"
    )
)


def test_known_ids_and_special_tokens(llama3_tokenizer):
    tok = llama3_tokenizer
    assert len(tok) == 128_256
    for text, ids in KNOWN_IDS.items():
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(128_000, 128_256))
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, 128004)
    assert tok.chat_template is None  # template "auto" then uses the built-in Llama 3.1 format


def test_bos_added_once_and_text_round_trips(llama3_tokenizer):
    text = "Grüße, 世界! 12345 <|eot_id|> done"
    ids = llama3_tokenizer(text)["input_ids"]
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert 128009 in ids  # special tokens written in text are the special token
    assert llama3_tokenizer.decode(ids[1:]) == text


def test_load_tokenizer_reads_a_meta_format_folder(tmp_path, llama3_tokenizer):
    from lorafit.models.tokenizer import load_tokenizer

    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").symlink_to(LLAMA3_TOKENIZER)
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(str(tmp_path))
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    assert tok.pad_token_id == 128004 and tok.pad_token_id not in (128001, 128008, 128009)


def test_a_foreign_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("this is not a tiktoken file\n")
    with pytest.raises(ModelError, match="tiktoken"):
        load_llama3_tokenizer(bad)
    with pytest.raises(ModelError, match="does not exist"):
        load_llama3_tokenizer(tmp_path / "missing.model")
