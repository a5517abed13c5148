"""What a user reads when something is wrong: one prefix, and advice that points the right way."""

from __future__ import annotations

import pytest

from node.errors import ConfigError
from node.faces.cli import build_parser
from node.ops import validate_host_port


@pytest.mark.parametrize("argv", [["start", "--experts", "many"], ["status"], ["nonsense"], ["start", "--bogus"]])
def test_every_usage_error_starts_with_the_one_prefix(argv: list, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's errors of a subcommand used to read `node start: error:`, the others `node: error:`."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == ConfigError.exit_code
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("node: error: "), lines


def test_a_bad_metrics_address_suggests_the_default_port_not_node_exporters() -> None:
    with pytest.raises(ConfigError) as info:
        validate_host_port("9347", "--metrics-addr")
    assert "127.0.0.1:9347" in str(info.value) and "9100" not in str(info.value)
