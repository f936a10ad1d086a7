"""hostagentd options (oslo.config): the command line, ``[DEFAULT]`` and one
section per area of the config file.

API.md's program options (``--socket-path``, ``--state-dir``,
``--libvirt-uri``, ``--detach-timeout``) are ``[DEFAULT]`` keys and command
line flags; the rest are config-file keys in their section.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from oslo_config import cfg, types
from oslo_log import _options, log

from hostagent import __version__
from hostagent.observability.logctx import CONTEXT_FORMAT, DEFAULT_FORMAT

DEFAULT_OPTS = [
    cfg.StrOpt(
        "socket-path",
        default="/run/hostagent/hostagent.sock",
        help="Unix socket the API is served on (mode 0660). Ignored when systemd "
        "passes a listening socket (socket activation).",
    ),
    cfg.StrOpt(
        "state-dir",
        default="/var/lib/hostagent",
        help="Directory of the sqlite state and the lock files; one daemon per directory.",
    ),
    cfg.StrOpt("libvirt-uri", default="qemu:///system", help="libvirt connection URI."),
    cfg.FloatOpt(
        "detach-timeout",
        default=20.0,
        min=0.1,
        help="Seconds one detach waits for the guest to release the device before 504.",
    ),
    cfg.FloatOpt(
        "incoming-migration-timeout",
        default=3600.0,
        min=0.0,
        help="Seconds an incoming attachment (live migration, API.md v1.1) waits for its "
        "domain; then reconcile releases it as abandoned.",
    ),
    cfg.StrOpt(
        "boot-id-path",
        default="/proc/sys/kernel/random/boot_id",
        help="Where this host's boot id is read (recorded with every connection; a new "
        "one at start means the host rebooted).",
    ),
    cfg.StrOpt(
        "disk-discard",
        default="unmap",
        choices=("unmap", "ignore"),
        help="Guest discards (TRIM/UNMAP) on volumes whose connection_info says "
        "discard: true: 'unmap' passes them to the storage (discard='unmap', like nova's "
        "hw_disk_discard), 'ignore' drops them.",
    ),
]

CLI_ONLY_OPTS = [
    cfg.BoolOpt(
        "rebuild-state",
        default=False,
        help="Record every ua- disk found in libvirt that the state lacks, then exit. "
        "For a lost state file; run it with the service stopped.",
    ),
]

API_OPTS: list[cfg.Opt] = [
    cfg.IntOpt(
        "workers",
        default=64,
        min=2,
        help="Threads running blocking API work (libvirt, os-brick, sqlite).",
    ),
    cfg.FloatOpt(
        "header_timeout",
        default=30.0,
        min=0.1,
        help="Seconds a connection has to send a request's line and headers, counted "
        "from its opening or its previous response; then 408 request_timeout, or, if "
        "nothing of a request arrived (an idle keep-alive connection), it is closed.",
    ),
    cfg.IntOpt(
        "max_connections",
        default=256,
        min=1,
        help="Connections open at once; one more is answered 503 too_many_connections "
        "and closed (keep it well under the process's open file limit).",
    ),
    cfg.ListOpt(
        "allowed_uids",
        item_type=types.Integer(min=0),
        default=[],
        help="uids besides root that may use the API (checked with SO_PEERCRED).",
    ),
    cfg.ListOpt(
        "allowed_gids",
        item_type=types.Integer(min=0),
        default=[],
        help="gids whose members may use the API (primary or supplementary group), "
        "e.g. the hostagent group the socket belongs to.",
    ),
]

LIBVIRT_OPTS: list[cfg.Opt] = [
    cfg.IntOpt(
        "connections",
        default=4,
        min=1,
        help="libvirt connections the daemon opens; each carries at most 4 calls at once "
        "(libvirtd serves 5 per client by default and stalls a client over that).",
    ),
    cfg.FloatOpt(
        "detach_retry_interval",
        default=5.0,
        min=0.1,
        help="Seconds between repeated unplug requests while a detach waits.",
    ),
    cfg.StrOpt(
        "domain_config_dir",
        default="",
        help="Where libvirtd saves persistent domain configs (<name>.xml), watched so "
        "they are read from libvirt only after a change. Empty: /etc/libvirt/qemu "
        "when libvirt_uri is the local system instance, else no caching; 'none': "
        "read every config from libvirt each time.",
    ),
    cfg.StrOpt(
        "domain_status_dir",
        default="",
        help="Where libvirtd keeps running domains' status (<name>.xml), watched so "
        "their live XML is read from libvirt only after a change. Empty: "
        "/run/libvirt/qemu when libvirt_uri is the local system instance, else no "
        "caching; 'none': read every live XML from libvirt each time.",
    ),
]

RECONCILE_OPTS: list[cfg.Opt] = [
    cfg.IntOpt(
        "interval",
        default=300,
        min=0,
        help="Seconds between periodic reconciles; 0 disables the periodic run.",
    ),
    cfg.IntOpt(
        "tombstone_ttl",
        default=7 * 86400,
        min=86400,
        help="Seconds a finished detach is remembered (replayed DELETE, refused id reuse).",
    ),
]

ISCSI_OPTS: list[cfg.Opt] = [
    cfg.BoolOpt(
        "use_multipath",
        default=False,
        help="Log in to every portal of a multipath target (target_portals) and use the "
        "multipath device; needs multipathd.",
    ),
]

RBD_OPTS: list[cfg.Opt] = [
    cfg.StrOpt(
        "attach_mode",
        default="librbd",
        choices=[
            ("librbd", "QEMU opens the image itself; the agent keeps the cephx secret"),
            ("krbd", "the kernel maps the image (rbd map) to a /dev/rbdN block device"),
        ],
        help="How RBD volumes reach guests.",
    ),
]

LOCAL_OPTS: list[cfg.Opt] = [
    cfg.ListOpt(
        "allowed_devices",
        default=[],
        help="Globs a local device must match (its resolved path, /dev/<kernel name>, or "
        "one of its /dev/disk/by-* links), e.g. /dev/disk/by-id/nvme-*,/dev/loop*; "
        "empty: any block device the host itself does not use.",
    ),
]

CONNECTOR_OPTS: list[cfg.Opt] = [
    cfg.StrOpt(
        "host",
        default=socket.gethostname(),
        sample_default="<this host's name>",
        help="The stable host name reported in connector properties.",
    ),
    cfg.StrOpt(
        "my_ip",
        help="The initiator IP to report when no target is named; default: the source "
        "address of the default route.",
    ),
]

NOISY_LIBRARIES = [
    "os_brick=WARNING",
    "oslo_concurrency=WARNING",
    "oslo_privsep=WARNING",
    "aiohttp=WARNING",
    "urllib3=WARNING",
]

GROUPS: dict[str, list[cfg.Opt]] = {
    "api": API_OPTS,
    "libvirt": LIBVIRT_OPTS,
    "reconcile": RECONCILE_OPTS,
    "connector": CONNECTOR_OPTS,
    "iscsi": ISCSI_OPTS,
    "local": LOCAL_OPTS,
    "rbd": RBD_OPTS,
}


# hostagentd's defaults for oslo.log's options (stderr, which systemd puts in
# the journal; lines that name their request, attachment and volume).
LOG_DEFAULTS: dict[str, object] = {
    "use_stderr": True,
    "logging_context_format_string": CONTEXT_FORMAT,
    "logging_default_format_string": DEFAULT_FORMAT,
    "default_log_levels": NOISY_LIBRARIES,
}


def update_log_defaults() -> None:
    """oslo-config-generator hook (``oslo.config.opts.defaults``): the sample
    shows hostagentd's oslo.log defaults, not the library's."""
    every_log_opt = [
        *_options.common_cli_opts,
        *_options.logging_cli_opts,
        *_options.generic_log_opts,
        *_options.log_opts,
    ]
    cfg.set_defaults(every_log_opt, **LOG_DEFAULTS)


def load_config(argv: Sequence[str]) -> cfg.ConfigOpts:
    """Parse ``argv`` and the config files into a fresh ConfigOpts.

    oslo.log's options (``--debug``, ``--log-file``, ``--use-journal``,
    ``[DEFAULT] use_stderr``, the format strings, ...) come with it; by default
    hostagentd logs to stderr, which systemd puts in the journal.
    """
    conf = cfg.ConfigOpts()
    log.register_options(conf)
    for name, value in LOG_DEFAULTS.items():
        conf.set_default(name, value)
    conf.register_cli_opts(DEFAULT_OPTS)
    conf.register_cli_opts(CLI_ONLY_OPTS)
    for group, opts in GROUPS.items():
        conf.register_opts(opts, group=group)
    conf(list(argv), project="hostagent", prog="hostagentd", version=__version__)
    return conf


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """Entry point for oslo-config-generator (the sample in etc/hostagent)."""
    return [(None, list(DEFAULT_OPTS)), *((group, list(opts)) for group, opts in GROUPS.items())]
