"""Keep secrets out of everything lorafit prints or writes: logs, error messages, saved configs and reports.

Two sources of secrets: the values of secret-looking environment variables (HF_TOKEN, WANDB_API_KEY,
AWS_SECRET_ACCESS_KEY ...), and token shapes that are secret wherever they appear (Hugging Face `hf_...`
tokens, `Bearer ...` headers, passwords in URLs, `token=...` query parameters). `redact` replaces them
with `***`; it runs at every boundary where text leaves the process (see docs/faults.md).
"""

from __future__ import annotations

import html
import json
import logging
import os
import re

MASK = "***"
MIN_SECRET_LEN = 8  # shorter env values ("1", "true") would mask ordinary words
# An env var is secret if a part of its name says so: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY,
# AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD. TOKENIZERS_PARALLELISM is not (`TOKENIZERS` is another word).
SECRET_NAME = re.compile(r"(^|_)(TOKEN|API_?KEY|SECRET|PASSWORD|PASSWD|ACCESS_KEY|AUTH)(_|$)")
NOT_SECRET_SUFFIX = ("_PATH", "_FILE", "_DIR", "_HOME", "_URL", "_ENDPOINT")  # HF_TOKEN_PATH names a file, not a token
PATTERNS = [
    (
        re.compile(r"(hf_|api_org_)[A-Za-z0-9]{20,}"),
        r"\1" + MASK,
    ),  # Hub tokens are hf_ + 34 characters; names are shorter
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1" + MASK),  # Authorization headers
    (re.compile(r"\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@"), r"\1" + MASK + "@"),  # https://user:password@host
    (re.compile(r"(?i)\b((?:access_|api_|auth_)?(?:token|key|password|secret)=)[^&\s\"']{8,}"), r"\1" + MASK),
]


def secret_values(environ=None) -> list[str]:
    """Values of secret-looking environment variables, longest first (so a value inside another goes second)."""
    environ = os.environ if environ is None else environ
    values = {
        v
        for k, v in environ.items()
        if SECRET_NAME.search(k.upper()) and not k.upper().endswith(NOT_SECRET_SUFFIX) and len(v) >= MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ=None) -> str:
    """`text` with every secret replaced by ***: as written, JSON-escaped, and HTML-escaped."""
    if not text:
        return text
    text = str(text)
    for value in secret_values(environ):
        for form in {value, json.dumps(value)[1:-1], html.escape(value)}:
            text = text.replace(form, MASK)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Redacts every record a handler emits, from lorafit or from any library that logs through it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:  # tracebacks are formatted later: format them now
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add the filter to the handlers of `logger` (default: the root logger, where records end up)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
