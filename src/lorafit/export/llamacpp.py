"""A GGUF file run by real llama.cpp (llama-cpp-python): prompts rendered with the chat template inside the file.

This is what `lorafit verify` and the tests use to prove an export: the prompt is rendered from the GGUF's own
`tokenizer.chat_template` by the formatter llama-cpp-python's chat completion uses for it, tokenized by
llama.cpp's tokenizer (special tokens parsed, BOS exactly once as the file's `add_bos_token` says), and decoded
greedily; `finish_reason` is "stop" only when llama.cpp itself saw an end-of-generation token.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import ModelError


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop": an end-of-generation token; "length": max_tokens reached
    tokens: int  # generated tokens (the end token excluded)
    seconds: float


class LlamaCppModel:
    """One GGUF loaded in llama.cpp on the CPU (threads: all cores unless LORAFIT_LLAMACPP_THREADS says)."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, logits_all: bool = False):
        try:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError:
            raise ModelError(
                "llama-cpp-python is not installed, so the GGUF cannot be run in llama.cpp.",
                "pip install llama-cpp-python  (it compiles llama.cpp: cmake and a C++ compiler)",
            ) from None
        threads = int(os.environ.get("LORAFIT_LLAMACPP_THREADS", "0")) or os.cpu_count() or 1
        try:
            self.llm = load_llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_batch=min(n_ctx, 512),
                logits_all=logits_all,
                verbose=False,
            )
        except ValueError as err:  # llama-cpp-python reports a file llama.cpp cannot load as ValueError
            raise ModelError(
                f"llama.cpp could not load {path}: {err}",
                "Export it again with `lorafit export RUN_DIR --format gguf --out FILE`.",
            ) from None
        self.path = Path(path)
        meta = self.llm.metadata
        self.chat_template = meta.get("tokenizer.chat_template")
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.bos_id, self.eos_id = self.llm.token_bos(), self.llm.token_eos()
        text = self.llm._model.token_get_text  # the same token texts llama-cpp-python gives the template
        self.bos_text = text(self.bos_id) if self.bos_id >= 0 else ""
        self.eos_text = text(self.eos_id) if self.eos_id >= 0 else ""
        if not self.chat_template:
            raise ModelError(
                f"{path} has no chat template (tokenizer.chat_template), so prompts cannot be rendered.",
                "Export it with lorafit, which stores the template training used.",
            )
        self.formatter = Jinja2ChatFormatter(
            template=self.chat_template, eos_token=self.eos_text, bos_token=self.bos_text, add_generation_prompt=True
        )

    def render(self, messages: list[dict]) -> str:
        return self.formatter(messages=messages).prompt

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids for rendered text: special tokens parsed, BOS once when the file asks for it."""
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self.add_bos and self.bos_id >= 0 and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenize(self.render(messages))

    def complete(self, prompt_ids: list[int], max_tokens: int) -> Completion:
        """Greedy decoding (temperature 0, no repetition penalty) from token ids."""
        start = time.perf_counter()
        out = self.llm.create_completion(
            prompt=prompt_ids, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, stop=[]
        )
        seconds = time.perf_counter() - start
        choice = out["choices"][0]
        return Completion(choice["text"], choice["finish_reason"], out["usage"]["completion_tokens"], seconds)

    def logits(self, ids: list[int]):
        """Logits at every position (needs logits_all=True)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)])

    def close(self) -> None:
        self.llm.close()


_PARAMS_LOCK = threading.Lock()


def load_llama(**kwargs):
    """llama-cpp-python's `Llama(**kwargs)`, without llama.cpp's extra weight buffers on a CPU with AMX.

    On a CPU with AMX (Intel Sapphire Rapids and later) llama.cpp repacks q4_0, q4_1 and q8_0 weights into an AMX
    buffer, and its AMX matmul then crashes the process with a segmentation fault on the first forward (seen on this
    project's Xeon VMs with llama-cpp-python 0.3.36: every q8_0 export; reported upstream as ggml-org/llama.cpp#20824,
    open). Without extra buffers (`use_extra_bufts`) the same weights run through llama.cpp's plain CPU kernels, with
    the same results. llama-cpp-python's `Llama` has no argument for it: it starts from
    `llama_model_default_params()`, so that function is swapped while the model loads (under a lock).
    """
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    default = low.llama_model_default_params
    if not (has_amx() and hasattr(default(), "use_extra_bufts")):  # older builds have no such setting
        return Llama(**kwargs)

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    with _PARAMS_LOCK:
        low.llama_model_default_params = without_extra_buffers
        try:
            return Llama(**kwargs)
        finally:
            low.llama_model_default_params = default


def has_amx() -> bool:
    """Whether the llama.cpp build found AMX on this CPU (and would use its AMX buffers)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
