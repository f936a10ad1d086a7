"""hostagentd's configuration: its oslo.log defaults, in the daemon and in the sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hostagent.daemon.conf import LOG_DEFAULTS, load_config
from hostagent.observability.logctx import CONTEXT_FORMAT

ROOT = Path(__file__).parents[2]


def test_the_daemon_starts_with_hostagents_log_defaults() -> None:
    conf = load_config([])
    for name, value in LOG_DEFAULTS.items():
        assert getattr(conf, name) == value, name


def test_the_generated_sample_shows_hostagents_log_defaults(tmp_path: Path) -> None:
    """oslo-config-generator runs our ``oslo.config.opts.defaults`` hook, so an
    operator reading the sample sees the format hostagentd really uses."""
    sample = tmp_path / "hostagent.conf.sample"
    subprocess.run(
        [
            Path(sys.executable).parent / "oslo-config-generator",
            "--config-file",
            ROOT / "etc/hostagent/config-generator.conf",
            "--output-file",
            sample,
        ],
        check=True,
        cwd=ROOT,
    )
    lines = sample.read_text().splitlines()
    assert f"#logging_context_format_string = {CONTEXT_FORMAT}" in lines
    assert "#use_stderr = true" in lines
    assert any(line.startswith("#default_log_levels = os_brick=WARNING") for line in lines)


def test_the_http_limits_are_api_options(tmp_path: Path) -> None:
    """[api] header_timeout and max_connections reach the daemon (defaults: 30 s, 256)."""
    assert (load_config([]).api.header_timeout, load_config([]).api.max_connections) == (30, 256)
    config = tmp_path / "hostagent.conf"
    config.write_text("[api]\nheader_timeout = 2.5\nmax_connections = 10\n")
    conf = load_config(["--config-file", str(config)])
    assert (conf.api.header_timeout, conf.api.max_connections) == (2.5, 10)
