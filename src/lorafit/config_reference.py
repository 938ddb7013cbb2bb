"""`lorafit config-reference`: every config field as a Markdown table (the README's config reference)."""

from __future__ import annotations

from pydantic import BaseModel

from lorafit.config import DataSource, RunConfig


def reference() -> str:
    """Markdown table of every field: the README's config reference is generated from this."""
    rows = ["| field | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            rows.append(f"| `{prefix}{name}` | `{default!r}` | {field.description or ''} |")

    walk(RunConfig, "")
    for name, field in DataSource.model_fields.items():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append(f"| `data.train[].{name}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)
