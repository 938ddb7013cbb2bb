"""Special tokens, defined once: the ignore label, the end-of-turn tokens, BOS-exactly-once, the Llama 3 split regex.

A leaf module: templates, encoding, collation, the loss, generation and GGUF export all read these facts
from here, so they cannot drift apart.
"""

from __future__ import annotations

from lorafit.errors import DataError

IGNORE_INDEX = -100  # label of a token that takes no loss (PyTorch's cross_entropy default ignore_index)

# Every token that ends a turn or a document in the families lorafit knows. The Llama 3.1 ones come first, in
# the order that matters there: <|eot_id|> ends a turn, <|eom_id|> ends a built-in tool call, <|end_of_text|>
# ends a document; all of them stop generation.
LLAMA31_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
END_TOKENS = LLAMA31_END_TOKENS + ("<|im_end|>", "<|endoftext|>", "</s>", "<end_of_turn>")
TEXT_END_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>")  # appended to raw-text documents

# Meta's pre-tokenizer split for Llama 3 (tiktoken): the fast tokenizer is built with it, and GGUF export
# recognises a Llama 3 tokenizer by it.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def token_id(tokenizer, token: str) -> int | None:
    """Id of `token` if the vocabulary has it (get_vocab() copies 128k entries; this does not)."""
    i = tokenizer.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == token else None


def special_token_strings(tokenizer) -> set[str]:
    """Texts the tokenizer reads as special tokens (Llama 3 has 256, most of them reserved)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {t for t in tokenizer.all_special_tokens if t} | {
        t.content for t in added.values() if t.special and t.content
    }


def end_token_ids(tokenizer) -> list[int]:
    """Every token that ends a turn or a document for this tokenizer (eos, eot, im_end ...)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= {i for i in (token_id(tokenizer, t) for t in END_TOKENS) if i is not None}
    return sorted(ids)


def text_end_id(tokenizer) -> int:
    """The end-of-document token appended to raw text."""
    for token in TEXT_END_TOKENS:
        if token_id(tokenizer, token) is not None:
            return token_id(tokenizer, token)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-text token, so raw text cannot be trained to stop.")
    return tokenizer.eos_token_id


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` puts a BOS in front (Llama yes, ChatML models usually no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_rendered(tokenizer, text: str, bos: bool | None = None) -> list[int]:
    """Ids of rendered text with BOS exactly once: the template's own, else the tokenizer's if it uses one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return with_bos(tokenizer, ids, adds_bos(tokenizer) if bos is None else bos)


def with_bos(tokenizer, ids: list[int], bos: bool) -> list[int]:
    """The BOS-exactly-once rule: prepend the tokenizer's BOS when it uses one and the ids do not start with it."""
    if bos and (not ids or ids[0] != tokenizer.bos_token_id):
        return [tokenizer.bos_token_id] + ids
    return ids
