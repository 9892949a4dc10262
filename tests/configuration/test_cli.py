"""Every command line a user runs documents every flag and shows its default (`configuration.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from configuration.cli import HelpFormatter, documented_defaults


def parser_of(parse_args) -> argparse.ArgumentParser:
    """The parser a `parse_args(argv)` function builds, caught as it parses `--help`."""
    built = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        built.append(self)
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            parse_args(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = original
    return built[0]


def command_lines():
    from jobs import demo, evaluate, generate, precompute, train
    from pipelines import shapes

    return {"hart-train": train.parse_args, "hart-precompute": precompute.parse_args,
            "hart-generate": generate.parse_args, "hart-evaluate": evaluate.parse_args, "hart-demo": demo.parse_args,
            "pipelines.shapes": shapes.parse_args}


@pytest.mark.parametrize("name", sorted(command_lines()))
def test_every_flag_has_help_that_shows_its_default(name):
    assert documented_defaults(parser_of(command_lines()[name])) == {}


def test_the_check_catches_a_flag_without_help_or_default():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--bare")
    parser.add_argument("--quiet-none", help="what it does")  # default None, not explained
    parser.add_argument("--count", type=int, default=3, help="how many")  # shown by the formatter
    parser.add_argument("--switch", action="store_true", help="on or off")
    parser.add_argument("--named", help="a file (default: none)")
    assert documented_defaults(parser) == {"--bare": "no help", "--quiet-none": "no default shown"}
    text = parser.format_help()
    assert "how many (default: 3)" in text and "on or off (default: off)" in text


def test_evaluate_help_prints_its_description_once(capsys):
    from jobs.evaluate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    first_line = "judge an export (FID, KID, CLIP score, shapes prompt following)"
    assert out.count(first_line) == 1 and "hart-evaluate run --export" in out
