"""The `node` command's flags, frozen: a flag added or removed without its documentation fails here.

For `node start` the documented set is README.md's option table and NodeConfig's fields (each field is
one flag; `--config` names the file they may come from; `--public` and `--private` are short for
`--reachability public|private`); `node doctor` takes the same, plus the flags its README.md section names;
for `node status` it is README.md's section; for `node demo` the option table of README.md's "A local demo".
Everything is read in-process from ``build_parser()``: no subprocess, no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Dict, Set

from node.faces.cli import build_parser
from node.runtime import NodeConfig

README = Path(__file__).resolve().parents[2] / "README.md"

# Documented in the `node status --help` text only: README.md's `node status` section does not list it yet.
UNDOCUMENTED_STATUS_FLAGS = {"--timeout"}


def subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """``{name: parser}`` of the subcommands of ``parser`` (argparse keeps them in a private action)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def long_flags(parser: argparse.ArgumentParser) -> Set[str]:
    """Every ``--flag`` ``parser`` accepts, except ``--help``."""
    return {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")} - {
        "--help"
    }


def readme_section(heading: str) -> str:
    """The text under the level-2 heading ``heading`` of README.md, up to the next level-2 heading."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_subsection(heading: str) -> str:
    """The text under the level-3 heading ``heading`` of README.md, up to the next heading of level 2 or 3."""
    text = README.read_text()
    start = text.index(f"\n### {heading}\n")
    ends = [i for i in (text.find("\n## ", start + 1), text.find("\n### ", start + 1)) if i != -1]
    return text[start : min(ends, default=len(text))]


def readme_table_flags(heading: str) -> Set[str]:
    """The flags named in the first column of the tables of a README.md section."""
    rows = [line for line in readme_section(heading).splitlines() if line.startswith("| `--")]
    cells = [re.split(r"(?<!\\)\|", row)[1] for row in rows]  # a cell may hold an escaped \| (auto\|cpu)
    return {flag for cell in cells for flag in re.findall(r"--[a-z][a-z-]*", cell)}


def test_start_flags_are_the_documented_ones() -> None:
    flags = long_flags(subcommands(build_parser())["start"])
    fields = {"--" + field.name.replace("_", "-") for field in dataclasses.fields(NodeConfig)}
    assert flags == readme_table_flags("`node start`")
    assert flags - {"--config", "--public", "--private"} == fields


def test_doctor_takes_the_flags_of_start_and_documents_its_own() -> None:
    parsers = subcommands(build_parser())
    start, doctor = long_flags(parsers["start"]), long_flags(parsers["doctor"])
    own = doctor - start
    assert start <= doctor and own == {"--json", "--timeout"}
    documented = set(re.findall(r"--[a-z][a-z-]*", readme_subsection("`node doctor`")))
    assert own <= documented <= doctor


def test_every_config_field_documents_its_flag() -> None:
    for field in dataclasses.fields(NodeConfig):
        assert field.metadata.get("help") and field.metadata.get("metavar"), field.name


def test_status_flags_are_the_documented_ones() -> None:
    flags = long_flags(subcommands(build_parser())["status"])
    documented = set(re.findall(r"--[a-z][a-z-]*", readme_section("`node status`")))
    assert flags - UNDOCUMENTED_STATUS_FLAGS == documented
    assert UNDOCUMENTED_STATUS_FLAGS <= flags  # once README.md lists one, drop it from that set


def test_demo_flags_are_the_documented_ones() -> None:
    flags = long_flags(subcommands(build_parser())["demo"])
    assert flags == readme_table_flags("A local demo")


def test_commands_are_start_status_doctor_demo_and_the_founders_tools() -> None:
    commands = {"start", "status", "doctor", "demo", "keygen", "invite", "revoke", "contributions"}
    assert set(subcommands(build_parser())) == commands


def test_founders_tools_flags_are_documented() -> None:
    documented = set(re.findall(r"--[a-z][a-z-]*", readme_section("Members-only swarms")))
    for command in ("keygen", "invite", "revoke", "contributions"):
        flags = long_flags(subcommands(build_parser())[command])
        assert flags <= documented | {"--help"}, (command, flags - documented)
