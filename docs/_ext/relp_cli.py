"""Sphinx extension: write the CLI reference from the live argument parser.

At ``builder-inited`` it writes ``docs/_generated/cli_reference.md`` (included by
``cli.md``): every subcommand, option, default, output file and exit code, taken
from :func:`captum_relp.cli.build_parser`, so the page cannot drift from the code.
"""
from __future__ import annotations

import argparse
import os
import re

_OPTION = re.compile(r"(?<![`\w-])(--[a-z][a-z0-9-]*)")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _prose(text: object) -> str:
    """A description cell: option names in code font, so ``--no-plots`` is not typeset with an en-dash."""
    return _OPTION.sub(r"`\1`", _cell(text))


def _computed_default(help_text: str) -> str:
    """The words after "(default: " up to its closing parenthesis (nested parentheses kept), or "none"."""
    start = help_text.find("(default: ")
    if start < 0:
        return "none"
    depth, begin = 0, start + len("(default: ")
    for i in range(start, len(help_text)):
        depth += {"(": 1, ")": -1}.get(help_text[i], 0)
        if depth == 0:
            return help_text[begin:i]
    return help_text[begin:]


def _default(action: argparse.Action) -> str:
    """The Default cell: ``off`` for a flag; for an option whose default is computed at run time
    (parser default ``None``), the words its help gives in "(default: ...)"; else the value."""
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None:
        return _computed_default(action.help or "")
    return f"`{action.default}`"


def cli_reference() -> str:
    from captum_relp import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    chunks = []
    for command in cli.SUBCOMMANDS:
        name = command.__name__.rsplit(".", 1)[-1]
        subparser = sub.choices[name]
        rows = ["| Option | Default | Description |", "|---|---|---|"]
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # hidden options (kept for old command lines) are not documented
            flag = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.choices:
                flag += " {" + ", ".join(map(str, action.choices)) + "}"
            default = _default(action)
            rows.append(f"| {_cell(flag)} | {_prose(default)} | {_prose(action.help or '')} |")
        outputs = ["| File | Contents |", "|---|---|"] + [
            f"| `{_cell(path)}` | {_prose(what)} |" for path, what in command.OUTPUTS.items()]
        outputs.append(f"| `{cli._common.MANIFEST}` | the command, its settings and the files above (written last) |")
        chunks.append(f"## `captum-relp {name}`\n\n{_prose(command.__doc__.splitlines()[0].split(': ', 1)[-1])}\n\n"
                      + "\n".join(rows) + "\n\nOutput files (in `--out`):\n\n" + "\n".join(outputs) + "\n")
    codes = [("0", "success"), ("1", "any other error"),
             ("2", "bad arguments, or a model that cannot be loaded"),
             ("3", "the task cannot be built for this model (e.g. its tokenizer splits every name)")]
    chunks.append("## Exit codes\n\n| Code | Meaning |\n|---|---|\n"
                  + "\n".join(f"| {c} | {m} |" for c, m in codes) + "\n")
    return "\n".join(chunks)


def generate(app) -> None:
    out = os.path.join(app.srcdir, "_generated")
    os.makedirs(out, exist_ok=True)
    text = "<!-- generated at build time by docs/_ext/relp_cli.py: do not edit -->\n\n" + cli_reference()
    path = os.path.join(out, "cli_reference.md")
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)


def setup(app):
    app.connect("builder-inited", generate)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
