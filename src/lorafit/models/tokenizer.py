"""The tokenizer: the model's own, or the exact Llama 3 tokenizer built offline from Meta's `tokenizer.model`;
always with a pad token that is never an end token.

Llama 3.x checkpoints in Meta's format ship only `original/tokenizer.model`. transformers'
`TikTokenConverter` turns the BPE ranks into a fast tokenizer; the 256 special tokens are added here in
Meta's order (passing them to the converter alone was seen to give wrong ids) and every id is checked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorafit.data.special_tokens import LLAMA3_SPLIT_PATTERN, end_token_ids
from lorafit.data.templates import LLAMA31_CHAT_TEMPLATE, end_of_turn_ids
from lorafit.errors import ModelError
from lorafit.models.sources import hub_error, resolve_model
from lorafit.paths import cache_dir

log = logging.getLogger("lorafit")
# Tokens that are safe to pad with: never an end token, never produced by a chat template.
PAD_CANDIDATES = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad|>"]


_PAD_REPORTED: set[str] = set()  # pad tokens already announced in this process


def load_tokenizer(
    name: str, tokenizer_name: str | None = None, trust_remote_code: bool = False, revision: str | None = None
):
    """The model's own tokenizer, with a pad token that is never an end token."""
    from transformers import AutoTokenizer

    source = tokenizer_name if tokenizer_name else resolve_model(name)
    # Meta's tiktoken file: given itself, or in a folder (its `original/` folder, or that folder's copy) that has
    # no Hugging Face tokenizer files.
    folder = Path(source)
    candidates = (folder / "original" / "tokenizer.model", folder / "tokenizer.model")
    original = next((f for f in candidates if f.is_file()), None)
    try:
        if folder.is_file() or (
            folder.is_dir()
            and not (folder / "tokenizer.json").exists()
            and not (folder / "tokenizer_config.json").exists()
            and original is not None
        ):
            tokenizer = load_llama3_tokenizer(source if folder.is_file() else original)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise hub_error(source, err) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Padding with an end token makes collators mask the real end tokens; pick a harmless token instead."""
    ends = set(end_token_ids(tokenizer))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends:
        return
    vocab = tokenizer.get_vocab()
    choice = next((t for t in PAD_CANDIDATES if t in vocab), None)
    if choice is None:
        template = tokenizer.chat_template or ""
        special = [t for t in getattr(tokenizer, "all_special_tokens", [])] + [
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
        ]
        for token in special:
            tid = vocab.get(token)
            if tid is not None and tid not in ends and tid != tokenizer.bos_token_id and token not in template:
                choice = token
                break
    if choice is None:
        raise ModelError(
            "the tokenizer has no pad token and no spare special token to pad with.",
            "Set a tokenizer with a pad token via `model.tokenizer`.",
        )
    old = tokenizer.pad_token
    tokenizer.pad_token = choice
    if choice not in _PAD_REPORTED:  # once per process: several commands load the tokenizer twice
        _PAD_REPORTED.add(choice)
        log.info(
            "pad token set to %s (id %d): the tokenizer's pad %s is an end token or missing",
            choice,
            tokenizer.pad_token_id,
            old,
        )


def prepare_tokenizer(tokenizer, template: str) -> None:
    """A saved tokenizer must render prompts by itself: give the built-in Llama 3.1 format a Jinja template."""
    if template == "llama3" and not tokenizer.chat_template:
        tokenizer.chat_template = LLAMA31_CHAT_TEMPLATE


def generation_config_for(tokenizer, end_ids: list[int]):
    """Stop on every end-of-turn token (Llama 3.1: [128001, 128008, 128009]); pad with a non-end token."""
    from transformers import GenerationConfig

    eos = sorted(set(end_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=512,
    )


def save_tokenizer(tokenizer, folder: str | Path, template: str) -> None:
    """The tokenizer folder of a run: loads alone with AutoTokenizer (chat template inside, the built-in Llama 3.1
    format written as Jinja) and with GenerationConfig (generation_config.json, eos = every end-of-turn token)."""
    prepare_tokenizer(tokenizer, template)
    tokenizer.save_pretrained(folder)
    generation_config_for(tokenizer, end_of_turn_ids(tokenizer, template)).save_pretrained(folder)


# -- Meta's original Llama 3 tokenizer -------------------------------------------------------------------------

NUM_BASE_TOKENS = 128_000
NAMED_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
SPECIAL_TOKENS = NAMED_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]  # 256 in all
KNOWN_IDS = {"Hello world": [9906, 1917], "system": [9125], "user": [882], "assistant": [78191], "\n\n": [271]}


def load_llama3_tokenizer(path: str | Path):
    """A transformers fast tokenizer equal to Meta's Llama 3 tokenizer (vocabulary 128,256).

    BOS is added by `tokenizer(text)` like the official Hugging Face tokenizer; the chat template is left
    None so lorafit's built-in Llama 3.1 format is used (template `auto`). eos is `<|eot_id|>` (end of an
    assistant turn); pad is `<|finetune_right_pad_id|>`, never an end token.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"Llama 3 tokenizer file {path} does not exist.",
            "Point `model.tokenizer` at the `original/tokenizer.model` file of a Llama 3.x checkpoint.",
        )
    # Converting the BPE ranks takes ~10 s of Python; the result is cached by the file's content hash.
    cached = _cache_path(path)
    if (cached / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cached)
        tokenizer.chat_template = None
        _check_ids(tokenizer, path)
        return tokenizer
    try:
        backend = TikTokenConverter(vocab_file=str(path), pattern=LLAMA3_SPLIT_PATTERN).converted()
    except Exception as err:  # a corrupt or foreign file: tiktoken raises many different types
        raise ModelError(
            f"{path} is not a tiktoken BPE file ({type(err).__name__}: {str(err)[:200]}).",
            "Use Meta's `original/tokenizer.model` of a Llama 3.x checkpoint.",
        ) from None
    if backend.get_vocab_size() != NUM_BASE_TOKENS:
        raise ModelError(
            f"{path} has {backend.get_vocab_size():,} BPE tokens; a Llama 3 tokenizer has {NUM_BASE_TOKENS:,}."
        )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, NUM_BASE_TOKENS)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = None
    _check_ids(tokenizer, path)
    _save_cache(tokenizer, cached)
    return tokenizer


def _cache_path(path: Path) -> Path:
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"llama3-{digest}"


def _save_cache(tokenizer, target: Path) -> None:
    """Atomic (write then rename) so concurrent runs never read a half-written copy; a read-only cache is fine."""
    import os
    import shutil

    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_ids(tokenizer, path: Path) -> None:
    """The ids every Llama 3 checkpoint was trained with; a mismatch would silently train garbage."""
    problems = []
    for i, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != NUM_BASE_TOKENS + i:
            problems.append(f"{token} -> {got} (expected {NUM_BASE_TOKENS + i})")
    for text, ids in KNOWN_IDS.items():
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            problems.append(f"{text!r} -> {got} (expected {ids})")
    if len(tokenizer) != NUM_BASE_TOKENS + len(SPECIAL_TOKENS):
        problems.append(f"vocabulary {len(tokenizer)} (expected {NUM_BASE_TOKENS + len(SPECIAL_TOKENS)})")
    if problems:
        raise ModelError(f"the tokenizer built from {path} does not match Llama 3: " + "; ".join(problems[:5]))
