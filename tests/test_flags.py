"""The scripts' parsers (their shared flag groups: util/flags.py): every script's --help explains every flag and shows its default."""
import argparse
import importlib

import pytest

SCRIPTS = ["train", "sample", "sample_ddp", "extract_features", "evaluate"]


def script_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's parse_args builds, caught before it parses anything."""
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(module).parse_args([])
    return captured["parser"]


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_flag_has_help_text(module, monkeypatch):
    parser = script_parser(module, monkeypatch)
    unexplained = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS and not action.help
    ]
    assert unexplained == [], f"{module}.py flags without help text: {unexplained}"


@pytest.mark.parametrize("module", SCRIPTS)
def test_help_shows_the_defaults(module, monkeypatch):
    parser = script_parser(module, monkeypatch)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
