"""What a profile's server options give on the installed vLLM, without loading
a model: whether its tool and reasoning parsers are registered, whether
``tool_choice`` "auto", "required" and a named function will be answered or
refused, whether its chat template file exists, and whether every ``[engine]``
key is an engine argument of this release.

The tool-choice answer follows vLLM's own rule (its chat renderer,
``vllm/renderers/online_renderer.py`` in 0.32): a tool parser exists only when
the server runs with both ``--enable-auto-tool-choice`` and
``--tool-call-parser`` (vLLM's ``ParserManager.get_tool_parser`` is asked, so a
release that changes the rule changes the answer); without one, "auto" and
"required" and named choices are refused per line. Releases without
``ParserManager`` are reported as not known rather than guessed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..profiles import Profile
from .endpoints import _first, vllm_release

ANSWERED, REFUSED, UNKNOWN = "answered", "refused", "not known for this release"


@dataclass
class Capabilities:
    """What one profile's server options give on the installed vLLM."""

    profile: str
    release: str
    tool_parser: str | None
    tool_parser_registered: bool | None  # None: no tool parser named
    auto_tool_choice: bool
    tool_choice: dict[str, str]  # "auto" / "required" / "named" -> ANSWERED, REFUSED, UNKNOWN
    reasoning_parser: str | None
    reasoning_parser_registered: bool | None
    chat_template: str | None  # the file the profile names, resolved
    chat_template_present: bool | None
    unknown_engine_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for a terminal or a log."""
        tools = "no tool parser" if self.tool_parser is None else \
            f"tool parser {self.tool_parser}" + ("" if self.tool_parser_registered
                                                 else " (NOT REGISTERED)")
        choice = ", ".join(f"{k} {v}" for k, v in self.tool_choice.items()) or "no chat"
        parts = [f"vLLM {self.release}", tools,
                 f"auto tool choice {'on' if self.auto_tool_choice else 'off'}",
                 f"tool_choice: {choice}"]
        if self.reasoning_parser:
            parts.append(f"reasoning parser {self.reasoning_parser}" + (
                "" if self.reasoning_parser_registered else " (NOT REGISTERED)"))
        if self.chat_template:
            parts.append(f"chat template {self.chat_template}" + (
                "" if self.chat_template_present else " (MISSING)"))
        if self.unknown_engine_keys:
            parts.append(f"unknown engine keys {', '.join(self.unknown_engine_keys)}")
        return "; ".join(parts)


def _registered(manager: Any, name: str, getter: str) -> tuple[bool, list[str]]:
    known = sorted(manager.list_registered()) if hasattr(manager, "list_registered") else []
    try:
        getattr(manager, getter)(name)
        return True, known
    except Exception:  # noqa: BLE001 - vLLM raises KeyError or its own errors
        return False, known


def capabilities(profile: Profile) -> Capabilities:
    """Ask the installed vLLM what PROFILE's server options give (imports vLLM)."""
    chat = profile.chat
    problems: list[str] = []
    tool_registered = None
    if chat.tool_call_parser:
        manager = _first(("vllm.tool_parsers", "vllm.entrypoints.openai.tool_parsers"),
                         "ToolParserManager")
        tool_registered, known = _registered(manager, chat.tool_call_parser, "get_tool_parser")
        if not tool_registered:
            problems.append(f"tool_call_parser {chat.tool_call_parser!r} is not a tool parser "
                            f"of vLLM {vllm_release()}; it has: {', '.join(known)}")
    reasoning_registered = None
    if chat.reasoning_parser:
        manager = _first(("vllm.reasoning",), "ReasoningParserManager")
        reasoning_registered, known = _registered(manager, chat.reasoning_parser,
                                                  "get_reasoning_parser")
        if not reasoning_registered:
            problems.append(f"reasoning_parser {chat.reasoning_parser!r} is not a reasoning "
                            f"parser of vLLM {vllm_release()}; it has: {', '.join(known)}")
    if chat.enable_auto_tool_choice and not chat.tool_call_parser:
        problems.append("enable_auto_tool_choice needs a tool_call_parser (vLLM refuses to "
                        "start without one)")
    template = present = None
    if chat.chat_template:
        template = chat.template_argument(profile.source)
        present = Path(template).is_file() or "{" in template  # a file, or the template text
        if not present:
            problems.append(f"chat_template {template} does not exist")
    engine_args = _first(("vllm.engine.arg_utils",), "AsyncEngineArgs")
    known_keys = {f.name for f in dataclasses.fields(engine_args)}
    unknown = sorted(set(profile.engine) - known_keys)
    if unknown:
        problems.append(f"[engine] {', '.join(unknown)}: not engine arguments of vLLM "
                        f"{vllm_release()}")
    pooling = profile.engine.get("runner") == "pooling"  # serves no chat at all
    return Capabilities(
        profile=profile.name, release=vllm_release(), tool_parser=chat.tool_call_parser,
        tool_parser_registered=tool_registered, auto_tool_choice=chat.enable_auto_tool_choice,
        tool_choice={} if pooling else _tool_choice(
            chat.tool_call_parser if tool_registered else None, chat.enable_auto_tool_choice),
        reasoning_parser=chat.reasoning_parser, reasoning_parser_registered=reasoning_registered,
        chat_template=template, chat_template_present=present, unknown_engine_keys=unknown,
        problems=problems)


def _tool_choice(parser: str | None, auto: bool) -> dict[str, str]:
    """vLLM's answer to each tool_choice, as its chat renderer decides it."""
    try:
        manager = _first(("vllm.parser.parser_manager", "vllm.parser"), "ParserManager")
    except ImportError:
        return {"auto": UNKNOWN, "required": UNKNOWN, "named": UNKNOWN}
    try:
        parsing = manager.get_tool_parser(parser, auto) is not None if parser else False
    except Exception:  # noqa: BLE001 - vLLM refuses the name: the server would not start
        parsing = False
    return {"auto": ANSWERED if parsing and auto else REFUSED,
            "required": ANSWERED if parsing else REFUSED,
            "named": ANSWERED if parsing else REFUSED}
