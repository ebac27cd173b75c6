"""The generated documentation pages: every sub-command, option and setting appears, from the code alone."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from app.cli import build_parser
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    """docs/hooks/reference.py, the MkDocs hook that generates the pages (not a package: loaded by path)."""
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_has_every_subcommand_and_option(reference):
    page = reference.render_cli()
    commands = list(reference.iter_commands(build_parser()))
    names = {full for full, _, _ in commands}
    # the leaves a user runs, and the groups above them
    assert {"selavpr serve", "selavpr index build", "selavpr weights fetch", "selavpr eval"} <= names
    for full, parser, _ in commands:
        assert f"### `{full}`" in page, full
        if reference.has_subcommands(parser):
            continue
        section = page.split(f"### `{full}`", 1)[1].split("\n### ", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in section, (full, option)


def test_settings_page_has_every_field_with_default_and_description(reference):
    page = reference.render_settings()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(SELAVPR_[A-Z0-9_]+)` \|.*$", page, re.M)}
    assert set(rows) == {f"SELAVPR_{name.upper()}" for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
        assert field.description.replace("|", "\\|") in rows[f"SELAVPR_{name.upper()}"]


def test_settings_page_names_the_serve_flag_of_a_setting(reference):
    rows = reference.render_settings()
    assert re.search(r"^\| `SELAVPR_API_KEY` \| unset \| `--api-key` \|", rows, re.M)
    assert re.search(r"^\| `SELAVPR_MAX_UPLOAD_BYTES` \| `26214400` \(25 MiB\) \|", rows, re.M)


def test_marked_pages_are_replaced_by_the_hook(reference):
    for page, marker in (("cli.md", reference.CLI_MARKER), ("configuration.md", reference.SETTINGS_MARKER)):
        text = (REPO / "docs" / page).read_text()
        assert marker in text
        assert marker not in reference.on_page_markdown(text, None, None, None)
