"""`lorafit verify RUN_DIR`: the same prompts through what was trained and what is served, side by side.

Three engines answer every prompt greedily: transformers with the adapter on its base (what training produced,
the reference), transformers with the adapter merged (what `merge` / `export` write from), and the GGUF in
llama.cpp (what llama.cpp and Ollama run), its prompt rendered from the chat template inside the file. The table
says how many answers are identical to the reference, where the first one differs, how many stopped on an end
token and the speed. Exit code 1 when an engine falls below the tolerance, so pipelines can gate on it.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.templates import encode_prompt, end_of_turn_ids, with_system
from lorafit.errors import ConfigError, DataError
from lorafit.export.gguf import write_gguf
from lorafit.export.llamacpp import LlamaCppModel
from lorafit.export.merge import merged_model
from lorafit.inference.generate import cut_at_end, load_for_inference, read_prompts
from lorafit.models.tokenizer import prepare_tokenizer
from lorafit.paths import user_path
from lorafit.rundir import load_run_config

log = logging.getLogger("lorafit")

# Least fraction of answers identical to the reference. f16/bf16 round each weight to 11/8 bits; greedy answers
# of a tuned model survive that (the demo: 10/10); q8_0 moves logits more (the demo: see README).
TOLERANCE = {"merged": 0.9, "f32": 0.9, "f16": 0.9, "bf16": 0.9, "q8_0": 0.7}
FILE_TYPES = {"0": "f32", "1": "f16", "7": "q8_0", "32": "bf16"}  # GGUF general.file_type


@dataclass
class Answer:
    text: str
    stop: str  # "stop" (an end token) or "length"
    tokens: int
    seconds: float


@dataclass
class Engine:
    name: str
    answers: list[Answer]
    tolerance: float | None = None  # None: the reference
    prompt_ids_equal: int | None = None  # llama.cpp only: prompts tokenized exactly as lorafit does
    identical: int = 0
    first_difference: str = ""
    differing: list[int] = field(default_factory=list)

    @property
    def stopped(self) -> int:
        return sum(a.stop == "stop" for a in self.answers)

    @property
    def tokens_per_second(self) -> float:
        seconds = sum(a.seconds for a in self.answers)
        return sum(a.tokens for a in self.answers) / seconds if seconds else 0.0

    def passed(self, reference: Engine) -> bool:
        if self.tolerance is None:
            return True
        n = len(self.answers)
        stops_lost = sum(a.stop != "stop" and r.stop == "stop" for a, r in zip(self.answers, reference.answers))
        prompts_ok = self.prompt_ids_equal is None or self.prompt_ids_equal == n
        return self.identical >= self.tolerance * n and stops_lost == 0 and prompts_ok


def hf_answers(loaded, conversations: list[list[dict]], max_new_tokens: int) -> list[Answer]:
    """Greedy answers one prompt at a time (no padding, so nothing but the weights can differ)."""
    import torch

    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    answers = []
    for messages in conversations:
        ids = encode_prompt(tok, messages, loaded.template)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=loaded.end_ids,
                pad_token_id=tok.pad_token_id,
            )
        seconds = time.perf_counter() - start
        new = out[0, len(ids) :].tolist()
        kept = cut_at_end(new, loaded.end_ids, None)
        stop = "stop" if len(kept) < len(new) else "length"
        answers.append(Answer(tok.decode(kept, skip_special_tokens=True).strip(), stop, len(kept), seconds))
    return answers


def gguf_answers(gguf: Path, conversations: list[list[dict]], want_ids: list[list[int]], max_new_tokens: int):
    """(answers, prompts whose llama.cpp token ids equal lorafit's, file type) from the GGUF in llama.cpp."""
    n_ctx = max(len(ids) for ids in want_ids) + max_new_tokens + 8
    model = LlamaCppModel(gguf, n_ctx=n_ctx)
    try:
        file_type = FILE_TYPES.get(str(model.llm.metadata.get("general.file_type")), "other")
        answers, equal = [], 0
        for messages, want in zip(conversations, want_ids):
            ids = model.prompt_ids(messages)
            equal += ids == want
            done = model.complete(ids, max_new_tokens)
            answers.append(Answer(done.text.strip(), done.finish_reason, done.tokens, done.seconds))
    finally:
        model.close()
    return answers, equal, file_type


def compare(engine: Engine, reference: Engine, tokenizer) -> None:
    """Count identical answers; describe the first difference token by token."""
    for k, (got, want) in enumerate(zip(engine.answers, reference.answers)):
        if got.text == want.text:
            engine.identical += 1
            continue
        engine.differing.append(k)
        if engine.first_difference:
            continue
        a = tokenizer(got.text, add_special_tokens=False)["input_ids"]
        b = tokenizer(want.text, add_special_tokens=False)["input_ids"]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shown = [repr(tokenizer.decode(ids[at : at + 1])) if at < len(ids) else "(end)" for ids in (a, b)]
        engine.first_difference = f"prompt {k + 1}, token {at + 1}: {shown[0]} vs {shown[1]}"


def parity_table(engines: list[Engine]) -> str:
    n = len(engines[0].answers)
    rows = [("engine", "identical", "stopped by end token", "prompt ids equal", "tokens/s", "first difference")]
    for e in engines:
        rows.append(
            (
                e.name,
                "reference" if e.tolerance is None else f"{e.identical}/{n}",
                f"{e.stopped}/{n}",
                "-" if e.prompt_ids_equal is None else f"{e.prompt_ids_equal}/{n}",
                f"{e.tokens_per_second:.1f}",
                e.first_difference or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def load_prompts(prompts_file: str | None, cfg) -> list[dict]:
    if prompts_file:
        return read_prompts(prompts_file)
    if cfg.eval.prompts:
        return [{"prompt": p, "messages": [{"role": "user", "content": p}]} for p in cfg.eval.prompts]
    raise DataError(
        "the run has no `eval.prompts`, so there is nothing to verify with.",
        "Pass --prompts FILE (JSONL with `prompt`, `question` or `messages` per line, or one prompt per line).",
    )


def _reference_and_merged(run: Path, conversations, max_new_tokens: int):
    """(reference engine, merged engine, merged model, loaded): the merged model is kept for a temporary GGUF."""
    loaded = load_for_inference(str(run), merge=False)
    reference = Engine("transformers, base + adapter", hf_answers(loaded, conversations, max_new_tokens))
    if loaded.cfg.model.quantization == "none":
        loaded.model = loaded.model.merge_and_unload()  # in place: no second copy of the weights
    else:  # a QLoRA base is 4-bit: merge into a full-precision reload, as `lorafit merge` does
        import torch

        device = next(loaded.model.parameters()).device
        loaded.model = None
        gc.collect()
        loaded.model = merged_model(run, torch.bfloat16)[0].to(device)
    merged = Engine("transformers, merged", hf_answers(loaded, conversations, max_new_tokens), TOLERANCE["merged"])
    return reference, merged, loaded


def verify(
    run_dir: str,
    gguf: str | None = None,
    prompts_file: str | None = None,
    max_new_tokens: int = 128,
    min_identical: float | None = None,
) -> int:
    """Print the parity table; 0 when every engine is within tolerance, 1 otherwise."""
    if min_identical is not None and not 0 <= min_identical <= 1:
        raise ConfigError(f"`--min-identical` is a fraction between 0 and 1, got {min_identical}.")
    run = user_path(run_dir)
    cfg = load_run_config(run)
    gguf_path = user_path(gguf) if gguf else None
    if gguf_path is not None and not gguf_path.is_file():
        raise DataError(f"GGUF file {gguf_path} does not exist.", "Pass the file `lorafit export` wrote.")
    rows = load_prompts(prompts_file, cfg)  # bad input fails before any model is loaded
    conversations = [with_system(r["messages"], cfg.data.system_prompt) for r in rows]
    reference, merged, loaded = _reference_and_merged(run, conversations, max_new_tokens)
    tok = loaded.tokenizer
    want_ids = [encode_prompt(tok, m, loaded.template) for m in conversations]
    with tempfile.TemporaryDirectory(prefix="lorafit-verify-") as tmp:
        if gguf_path is None:  # the f16 file `lorafit export` would write, from the merged weights in memory
            gguf_path = Path(tmp) / f"{run.name}-f16.gguf"
            prepare_tokenizer(tok, loaded.template)
            write_gguf(loaded.model, tok, end_of_turn_ids(tok, loaded.template), gguf_path, "f16", run.name)
        loaded.model = None
        gc.collect()
        answers, equal, file_type = gguf_answers(gguf_path, conversations, want_ids, max_new_tokens)
    tolerance = min_identical if min_identical is not None else TOLERANCE.get(file_type, TOLERANCE["q8_0"])
    served = Engine(f"llama.cpp, {gguf_path.name if gguf else 'f16 GGUF'} ({file_type})", answers, tolerance, equal)
    if min_identical is not None:
        merged.tolerance = min_identical
    for engine in (merged, served):
        compare(engine, reference, tok)
    return report(run, [reference, merged, served], rows, max_new_tokens)


def report(run: Path, engines: list[Engine], rows: list[dict], max_new_tokens: int) -> int:
    reference = engines[0]
    print(f"lorafit verify {run}: {len(rows)} prompts, greedy, at most {max_new_tokens} new tokens")
    print(parity_table(engines))
    failed = [e for e in engines if not e.passed(reference)]
    for e in engines[1:]:
        for k in e.differing[:3]:
            print(
                f"  {e.name}, prompt {k + 1} {rows[k]['prompt'][:60]!r}:\n"
                f"    reference: {reference.answers[k].text[:120]!r}\n    this:      {e.answers[k].text[:120]!r}"
            )
    for e in failed:
        print(
            f"FAILED {e.name}: {e.identical}/{len(rows)} identical (needs {e.tolerance:.0%}), "
            f"{e.stopped}/{len(rows)} stopped by an end token"
            + (
                ""
                if e.prompt_ids_equal in (None, len(rows))
                else f", {len(rows) - e.prompt_ids_equal} prompt(s) tokenized differently from training"
            )
        )
    if not failed:
        print(
            "verify: ok ("
            + "; ".join(f"{e.name} needs {e.tolerance:.0%} identical" for e in engines[1:])
            + ", every reference stop kept)"
        )
    return 1 if failed else 0
