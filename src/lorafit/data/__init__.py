"""The data pipeline: read -> format -> render/tokenize/mask -> pack -> collate. See prepare.py."""

from lorafit.data.collate import make_collator
from lorafit.data.prepare import PreparedData, prepare_data
from lorafit.data.templates import encode_prompt, end_of_turn_ids, render_prompt, resolve_template

__all__ = ["PreparedData", "prepare_data", "make_collator", "render_prompt", "encode_prompt", "end_of_turn_ids",
           "resolve_template"]
