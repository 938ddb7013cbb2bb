"""Each private transformers / datasets API lorafit uses (hf_compat.py) still behaves as lorafit needs."""

from __future__ import annotations

import pytest

from lorafit import hf_compat


def test_trainer_still_has_the_save_checkpoint_lorafit_overrides():
    hf_compat.check_trainer()  # raises on an incompatible transformers


def test_an_incompatible_trainer_fails_loudly_by_name(monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "_save_checkpoint", lambda self, model, trial, metrics: None)
    with pytest.raises(
        RuntimeError, match=r"Trainer._save_checkpoint has parameters .*'metrics'.*transformers>=5.17,<6"
    ):
        hf_compat.check_trainer()


def test_lorafit_trainer_overrides_the_checked_method():
    from transformers import Trainer

    from lorafit.train.trainer import LorafitTrainer

    assert LorafitTrainer._save_checkpoint is not Trainer._save_checkpoint
    assert LorafitTrainer.__mro__.index(Trainer) > 1  # the override comes first


def test_compiled_chat_template_renders_like_apply_chat_template(smollm2_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    compiled = hf_compat.compile_chat_template(smollm2_tokenizer.chat_template)
    for gen, msgs in ((False, messages), (True, messages[:2])):
        fast = compiled.render(
            messages=msgs, tools=None, documents=None, add_generation_prompt=gen, **smollm2_tokenizer.special_tokens_map
        )
        assert fast == smollm2_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_dataset_fingerprint_follows_content():
    import datasets

    a = datasets.Dataset.from_dict({"x": [1, 2, 3]})
    b = datasets.Dataset.from_dict({"x": [1, 2, 4]})
    assert isinstance(hf_compat.dataset_fingerprint(a), str)
    assert hf_compat.dataset_fingerprint(a) != hf_compat.dataset_fingerprint(b)
    assert hf_compat.dataset_fingerprint(a) != hf_compat.dataset_fingerprint(a.select([0, 1]))


def test_compiled_inner_finds_the_wrapped_module():
    import torch

    module = torch.nn.Linear(2, 2)
    assert hf_compat.compiled_inner(torch.compile(module)) is module  # wrapping compiles nothing until called
    assert hf_compat.compiled_inner(module) is None
