"""The README documents what the code has: every setting, every command."""

from __future__ import annotations

import pathlib

from click.testing import CliRunner

from imagestream import config
from imagestream_cli.main import main

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_lists_every_setting_as_the_code_defines_it() -> None:
    assert config.markdown_table() in README  # regenerate with: python -m imagestream.config


def test_readme_documents_every_command() -> None:
    for name, command in main.commands.items():
        assert f"imagestream {name}" in README, name
        if hasattr(command, "commands"):
            for sub in command.commands:
                assert sub in README


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, name
