"""The `relaylab` command line itself: every command and option explains itself,
--version, and a reader that goes away (`relaylab ... | head -1`) ends it quietly."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaylab.cli import build_parser, main


def parsers(p: argparse.ArgumentParser, path: str = "relaylab"
            ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for action in p._actions:  # argparse keeps its tree in private attributes
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, f"{path} {name}")


def test_every_command_has_a_description_and_every_option_a_help_text() -> None:
    missing = []
    for path, p in parsers(build_parser()):
        if not (p.description or "").strip():
            missing.append(f"{path}: no description")
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed = {a.dest: a.help for a in action._choices_actions}
                missing += [f"{path} {name}: no help in the command list"
                            for name in action.choices if not (listed.get(name) or "").strip()]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}: no help")
    assert missing == []
    # the walk does reach the leaves
    assert {"relaylab blacklist import", "relaylab dkim keygen", "relaylab limits show",
            "relaylab tracker"} <= {path for path, _ in parsers(build_parser())}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"relaylab {importlib.metadata.version('relaylab')}\n"


@pytest.mark.parametrize(("argv", "status"), [
    # argparse's own printing ignores write errors: --help still exits 0
    (["--help"], 0),
    (["dkim", "keygen", "--domain", "shop.example.com", "--selector", "s1", "--algorithm",
      "ed25519", "--out", "{tmp}/k.key"], 1),
], ids=["help", "keygen"])
def test_closed_pipe_ends_quietly(argv: list[str], status: int, tmp_path: Path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, err = run_with_closed_stdout(argv)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    assert err == "" and rc == status


def run_with_closed_stdout(argv: list[str]) -> tuple[int, str]:
    """Run `relaylab argv` with its stdout a pipe whose reader has already gone (what
    `| head -1` leaves behind once head has its line)."""
    proc = subprocess.Popen([sys.executable, "-m", "relaylab", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=60), err
