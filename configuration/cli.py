"""What the command lines share: help that shows every flag's default.

`HelpFormatter` keeps descriptions and epilogs as written (usage examples keep their line breaks)
and appends `(default: ...)` to each optional flag's help, `on`/`off` for switches. A flag whose
default is None says in its own help what happens then (`default: the protocol's`), since "None"
would tell a user nothing; `tests/configuration/test_cli.py` holds every command line to that.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.required:
            return text
        if isinstance(action.default, bool):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if isinstance(action.default, (list, tuple)) and not action.default:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def documented_defaults(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each optional flag of `parser` (and of its sub-commands) whose help is missing or shows no
    default, with what is wrong: the check behind `tests/configuration/test_cli.py`."""
    problems: dict[str, str] = {}
    formatter = HelpFormatter(parser.prog)
    chosen = {id(a) for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                problems.update({f"{name} {flag}": why for flag, why in documented_defaults(sub).items()})
            continue
        if isinstance(action, argparse._HelpAction) or not action.option_strings or action.required or id(action) in chosen:
            continue
        flag = action.option_strings[-1]
        if not action.help:
            problems[flag] = "no help"
        elif "default" not in formatter._get_help_string(action):
            problems[flag] = "no default shown"
    return problems


__all__ = ["HelpFormatter", "documented_defaults"]
