"""The command line: every subcommand's --help renders (argparse formats help strings lazily,
so a stray '%' only fails when a user asks for help)."""
import pytest

from tinyvit.cli import build_parser, main

SUBCOMMANDS = ["train", "bench", "predict", "attention", "info", "gradcheck"]


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: tinyvit {name}" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: tinyvit" in capsys.readouterr().out


def test_info_runs(capsys):
    assert main(["info"]) == 0
    assert "backends: numpy" in capsys.readouterr().out


def test_parser_builds():
    assert build_parser().prog == "tinyvit"
