"""hostagentctl's own parsing (the commands against a daemon: tests/integration/test_cli.py)."""

from __future__ import annotations

import argparse

import pytest

from hostagent.cli import parse_size


def test_sizes_take_binary_units() -> None:
    assert parse_size("2147483648") == 2 << 30
    assert parse_size("2G") == parse_size("2GiB") == 2 << 30
    assert parse_size("512m") == 512 << 20
    for bad in ("", "G", "-1", "0", "1.5G", "2X"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
