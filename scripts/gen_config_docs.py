"""Write docs/CONFIG.md (every config field, its type, default and help) from the pydantic models.

Run: .venv/bin/python scripts/gen_config_docs.py  (a test checks the file is up to date)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.config import JobConfig  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _nested(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _nested(info.annotation)
        if nested is not None and not str(info.annotation).startswith("list"):
            lines.append(f"| **`{path}`** | section | | {info.description or ''} |")
            lines.extend(rows(nested, prefix=f"{path}."))
            continue
        if nested is not None:
            lines.append(f"| `{path}` | list of items | `[]` | {info.description or ''} |")
            lines.extend(rows(nested, prefix=f"{path}[]."))
            continue
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        type_name = _type_name(info.annotation).replace("|", "\\|")
        lines.append(f"| `{path}` | {type_name} | `{default}` | {info.description or ''} |")
    return lines


def render() -> str:
    header = [
        "# Job config reference",
        "",
        "Generated from `orchestrator/config/` (`sections.py`, `tune_sections.py`, `job.py`) by "
        "`scripts/gen_config_docs.py`; the JSON schema is",
        "`orchestrator schema`. Unknown keys are errors. Strings may use `${VAR}` and `${VAR:-default}`.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    return "\n".join(header + rows(JobConfig)) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
