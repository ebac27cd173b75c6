"""Generated documentation pages: the CLI reference from the argparse parsers (app/cli.py) and the
configuration reference from `Settings` (app/settings.py), so that neither can drift from the code.

A MkDocs hook (`hooks:` in mkdocs.yml): a page holding one of the markers below gets the generated text in
its place when the site is built. The functions also run alone (tests/test_docs_reference.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

CLI_MARKER = "<!-- generated: cli-reference -->"
SETTINGS_MARKER = "<!-- generated: settings-reference -->"
MIB = 2**20


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs hook
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, render_cli())
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, render_settings())
    return markdown


# --- the command line ---


def iter_commands(
    parser: argparse.ArgumentParser, prefix: str = "selavpr"
) -> Iterator[tuple[str, argparse.ArgumentParser, str | None]]:
    """(full command name, parser, its help line) of every sub-command, depth first, in registration order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                full = f"{prefix} {name}"
                yield full, sub, helps.get(name)
                yield from iter_commands(sub, full)


def has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            name = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.nargs != 0:
                name += f" `{action.metavar or action.dest.upper()}`"
        else:
            name = f"`{action.metavar or action.dest.upper()}`"
            if action.nargs in ("*", "+"):
                name += " ..."
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            default = ""
        else:
            default = f"`{action.default}`"
        choices = f" (one of {', '.join(f'`{c}`' for c in action.choices)})" if action.choices else ""
        help_text = (action.help or "") % {"default": action.default} if action.help else ""
        rows.append(f"| {_cell(name)} | {_cell(default)} | {_cell(help_text)}{_cell(choices)} |")
    return rows


def render_cli() -> str:
    from app.cli import build_parser

    parser = build_parser()
    parts = []
    for full, sub, help_text in iter_commands(parser):
        parts += [f"### `{full}`", ""]
        summary = sub.description or help_text
        if summary:
            parts += [summary, ""]
        if has_subcommands(sub):
            continue  # its sub-commands follow, each with its own options
        usage = sub.format_usage().removeprefix("usage: ").strip()
        parts += ["```text", usage, "```", ""]
        rows = _option_rows(sub)
        if rows:
            parts += ["| argument | default | meaning |", "|---|---|---|", *rows, ""]
    return "\n".join(parts)


# --- the settings ---


def _default_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, int) and value >= MIB and value % MIB == 0:
        return f"`{value}` ({value // MIB:,} MiB)"
    if isinstance(value, str) and value == "":
        return '`""`'
    return f"`{value}`"


def serve_flags() -> dict[str, str]:
    """Settings field name -> the `selavpr serve` flag that sets it."""
    from app.cli import build_parser

    for full, sub, _ in iter_commands(build_parser()):
        if full == "selavpr serve":
            return {
                a.dest: max(a.option_strings, key=len)
                for a in sub._actions
                if a.option_strings and not isinstance(a, argparse._HelpAction)
            }
    return {}


def render_settings() -> str:
    from app.settings import Settings

    flags = serve_flags()
    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| variable | default | `selavpr serve` flag | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        flag = f"`{flags[name]}`" if name in flags else ""
        rows.append(
            f"| `{prefix}{name.upper()}` | {_cell(_default_text(field.get_default()))} | {flag} | "
            f"{_cell(field.description or '')} |"
        )
    return "\n".join(rows) + "\n"
