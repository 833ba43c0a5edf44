"""A bad configuration said in one line a person reads: where the value came
from (the file, or the environment variable that set it), the dotted key, and
for a key batchd does not know, "unknown key" with the nearest valid one."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel


def config_problem(err: Any, path: Path | None, root: type[BaseModel],
                   retired: Iterable[str] = ()) -> str:
    """One line for a person: where the bad value came from (the file, or the
    environment variable that set it), the dotted key, and for a key batchd does
    not know, "unknown key" with the nearest valid one and the valid ones. ERR
    is pydantic's first error for ROOT (the whole configuration's model);
    RETIRED keys are never suggested."""
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc)
    where = _value_source(loc, path)
    if err["type"] != "extra_forbidden":
        return f"{where}: {key}: {err['msg']}"
    model: Any = root
    for part in loc[:-1]:  # down to the section (or model) that holds the key
        field = model.model_fields.get(part)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return f"{where}: unknown key {key}"
    held = ".".join(loc[:-1])
    valid = [name for name in model.model_fields
             if name != "source" and f"{held}.{name}" not in retired]
    near = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
    hint = f" (did you mean {'.'.join([*loc[:-1], near[0]])}?)" if near else ""
    section = f"[{held}] keys" if held else "sections"
    return f"{where}: unknown key {key}{hint}; {section}: {', '.join(valid)}"


def _value_source(loc: list[str], path: Path | None) -> str:
    """The environment variable that set the key at LOC (BATCHD_SECTION__KEY, any
    case: it wins over the file), else the config file, else 'environment'."""
    wanted = ("BATCHD_" + "__".join(loc)).upper()
    for name in os.environ:
        if name.upper() == wanted:
            return f"environment variable {name}"
    return str(path) if path is not None else "environment"
