"""hostagentd options (oslo.config): command line and ``[DEFAULT]`` of the config file."""

from __future__ import annotations

from collections.abc import Sequence

from oslo_config import cfg

from hostagent import __version__

DEFAULT_OPTS = [
    cfg.StrOpt(
        "socket-path",
        default="/run/hostagent/hostagent.sock",
        help="Unix socket the API is served on (mode 0660).",
    ),
    cfg.StrOpt(
        "state-dir",
        default="/var/lib/hostagent",
        help="Directory of the sqlite state and the lock files.",
    ),
    cfg.StrOpt("libvirt-uri", default="qemu:///system", help="libvirt connection URI."),
    cfg.FloatOpt(
        "detach-timeout",
        default=20.0,
        min=0.1,
        help="Seconds one detach waits for the guest to release the device before 504.",
    ),
    cfg.FloatOpt(
        "detach-retry-interval",
        default=5.0,
        min=0.1,
        help="Seconds between repeated unplug requests while a detach waits.",
    ),
    cfg.IntOpt(
        "reconcile-interval",
        default=300,
        min=0,
        help="Seconds between periodic reconciles; 0 disables the periodic run.",
    ),
    cfg.IntOpt(
        "tombstone-ttl",
        default=7 * 86400,
        min=86400,
        help="Seconds a finished detach is remembered (replayed DELETE, refused id reuse).",
    ),
    cfg.IntOpt(
        "libvirt-connections",
        default=4,
        min=1,
        help="libvirt connections the daemon opens; each carries at most 4 calls at once "
        "(libvirtd serves 5 per client by default).",
    ),
    cfg.IntOpt(
        "api-workers",
        default=64,
        min=2,
        help="Threads running blocking API work (libvirt, os-brick, sqlite).",
    ),
    cfg.StrOpt(
        "boot-id-path",
        default="/proc/sys/kernel/random/boot_id",
        help="Where this host's boot id is read (recorded with every connection).",
    ),
    cfg.BoolOpt("debug", default=False, help="Log at DEBUG level."),
]

CLI_ONLY_OPTS = [
    cfg.BoolOpt(
        "rebuild-state",
        default=False,
        help="Record every ua- disk found in libvirt that the state lacks, then exit. "
        "For a lost state file; run it with the service stopped.",
    ),
]


def load_config(argv: Sequence[str]) -> cfg.ConfigOpts:
    """Parse ``argv`` and the config files into a fresh ConfigOpts."""
    conf = cfg.ConfigOpts()
    conf.register_cli_opts(DEFAULT_OPTS)
    conf.register_cli_opts(CLI_ONLY_OPTS)
    conf(list(argv), project="hostagent", prog="hostagentd", version=__version__)
    return conf


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """Entry point for oslo-config-generator."""
    return [(None, list(DEFAULT_OPTS))]
