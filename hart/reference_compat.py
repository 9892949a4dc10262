"""Whether the reference implementation (mit-han-lab/hart) can build a config we save.

Design: the released code reads most architecture from `config.json`, but it fixes a few
values in code instead (the tokenizer's conv-net depth, attention, GroupNorm groups and
discriminator size; the transformer's RoPE base and mode and the residual scale of its diffusion
head). Our configs make those values fields, so a folder we write can hold a network the reference
would build differently: its `from_pretrained` (Hugging Face) then fails on mismatched shapes, or
warns about missing or unexpected keys and fills the missing ones with random weights, or quietly
computes another function (a different GroupNorm group count changes no shape). Each loader module
owns its table of fixed values (`REFERENCE_FIXED` in `hart.tokenizer.model` and
`hart.transformer.checkpoint`); this module compares a config against such a table and tells the
truth in two places when they differ:

- a note next to `config.json` (`NOTE_FILE`), naming each field, our value and the reference's;
- a `ReferenceCompatibilityWarning` on the console naming the same fields.

A folder whose config the reference can build gets no note, and a note left by an earlier save
into the same folder is removed, so the note's presence always describes the files beside it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

NOTE_FILE = "REFERENCE_COMPATIBILITY.txt"


class ReferenceCompatibilityWarning(UserWarning):
    """A saved folder cannot be built by the reference implementation (see its note file)."""


@dataclass(frozen=True)
class Difference:
    field: str
    ours: Any
    reference: Any

    def describe(self) -> str:
        return f"{self.field}={json.dumps(self.ours)} (reference: {json.dumps(self.reference)})"


def differences(values: Mapping[str, Any], fixed: Mapping[str, Any], prefix: str = "") -> list[Difference]:
    """Fields of `values` whose value is not the one the reference fixes (`fixed`: field -> value)."""
    return [Difference(f"{prefix}{name}", values[name], value) for name, value in fixed.items() if values[name] != value]


def record(folder: str | Path, what: str, found: list[Difference], loader: str, explanation: str = "") -> None:
    """Write or remove `folder/NOTE_FILE` for these differences, and warn when there are any.

    `what` names the model ("tokenizer", "transformer"); `loader` is this project's loading call;
    `explanation` is a last paragraph of the note (e.g. where prefixed fields come from).
    """
    note = Path(folder) / NOTE_FILE
    if not found:
        note.unlink(missing_ok=True)
        return
    width = max(len(d.field) for d in found)
    rows = [f"  {d.field:<{width}}  ours {json.dumps(d.ours):<8}  reference {json.dumps(d.reference)}" for d in found]
    note.write_text(
        f"This {what} folder loads with this project's loader ({loader}),\n"
        f"not with the reference implementation (mit-han-lab/hart). The reference fixes these values in\n"
        f"code instead of reading them from config.json, so it would build another network:\n\n"
        + "\n".join(rows) + "\n" + (f"\n{explanation}\n" if explanation else "")
    )
    warnings.warn(
        f"{folder}: the reference implementation cannot build this {what}: "
        + ", ".join(d.describe() for d in found) + f"; see {note.name} there",
        ReferenceCompatibilityWarning, stacklevel=3,
    )


__all__ = ["NOTE_FILE", "ReferenceCompatibilityWarning", "Difference", "differences", "record"]
