"""hostagentctl: a thin command line over the v1 API (plus offline ``xml``).

Every command prints the API's JSON as the daemon sent it (``--json``) or a view of
it for people. Only ``attach`` loads pydantic (to check the request before sending
it) and only ``xml`` loads os-brick, so the read commands start as fast as Python.
"""

# ruff: noqa: PLC0415  (pydantic and os-brick are imported by the commands that need them)

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hostagent.client import (
    ApiError,
    HostagentClient,
    attachment_path,
    connector_path,
    default_socket,
)

EXIT_ERROR = 2


class CliError(Exception):
    """A mistake found before or without the daemon (bad request body, XML not renderable)."""


def _text(value: Any) -> str:
    """A value as an operator reads it: no Python reprs (None, True, ['a'])."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) or "-"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(c).upper() for c in columns]]
    cells += [[_text(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _fields(data: dict[str, Any], skip: Sequence[str]) -> list[str]:
    return [f"  {key}: {_text(value)}" for key, value in data.items() if key not in skip]


def _evenly_indented(xml: str) -> list[str]:
    """libvirt's ``<disk>`` cut out of a domain keeps the domain's indentation on every
    line but the first; dedent the rest so it reads like ``virsh attach-device`` input."""
    first, _, rest = xml.strip().partition("\n")
    return [first, *textwrap.dedent(rest).splitlines()]


def _print(data: Any, as_json: bool, human: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if as_json else human)


def _get(client: HostagentClient, path: str) -> Any:
    return client.request("GET", path)[1]


def _read_json(source: str) -> Any:
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    return json.loads(text)


ATTACHMENT_COLUMNS = (
    "attachment_id",
    "volume_id",
    "domain_name",
    "state",
    "alias",
    "target_dev",
    "bus",
    "mode",
    "shareable",
    "host_refcount",
    "connection_key",
)
CONNECTION_COLUMNS = (
    "connection_key",
    "driver_volume_type",
    "device_path",
    "state",
    "host_refcount",
    "attachments",
    "connected_at",
)


# The state gauges of GET /metrics: one sample per state, counted from the
# store at every scrape (hostagent/observability/metrics.py).
_STATE_SAMPLE = re.compile(
    r'^(hostagent_attachments|hostagent_connections)\{state="[^"]*"\} ([0-9.eE+]+)$', re.M
)


def _state_counts(client: HostagentClient) -> tuple[int, int]:
    """(attachments, host connections) in every state, from the metrics' state
    gauges: one small answer whatever the number of attachments, where the two
    lists grow with them."""
    counts = {"hostagent_attachments": 0.0, "hostagent_connections": 0.0}
    try:
        samples = _STATE_SAMPLE.findall(client.text("/metrics"))
    except ApiError as exc:
        if exc.status != 404:
            raise
        samples = []  # a daemon without GET /metrics
    for family, value in samples:
        counts[family] += float(value)
    if {family for family, _ in samples} != set(counts):  # a daemon without the gauges
        return (
            len(_get(client, "/v1/attachments")["attachments"]),
            len(_get(client, "/v1/connections")["connections"]),
        )
    return int(counts["hostagent_attachments"]), int(counts["hostagent_connections"])


def cmd_status(client: HostagentClient, args: argparse.Namespace) -> int:
    health = _get(client, "/v1/health")
    attachments, connections = _state_counts(client)
    summary = {"health": health, "attachments": attachments, "connections": connections}
    _print(
        summary,
        args.json,
        f"hostagentd {health['version']}: {health['status']} (libvirt {health['libvirt']})\n"
        f"socket: {client.socket_path}\n"
        f"attachments: {attachments}   host connections: {connections}",
    )
    return 0 if health["status"] == "ok" else 1


def cmd_list(client: HostagentClient, args: argparse.Namespace) -> int:
    listing = _get(client, "/v1/attachments")
    _print(listing, args.json, _table(listing["attachments"], ATTACHMENT_COLUMNS))
    return 0


def cmd_connections(client: HostagentClient, args: argparse.Namespace) -> int:
    listing = _get(client, "/v1/connections")
    # Comma without a space: a table cell must not contain the column separator.
    rows = [
        dict(c, attachments=",".join(c["attachments"]) or None) for c in listing["connections"]
    ]
    _print(listing, args.json, _table(rows, CONNECTION_COLUMNS))
    return 0


def _attach_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request body, checked here so a mistake is named before anything is sent."""
    from pydantic import ValidationError

    from hostagent.api.models import AttachRequest, describe_validation_error

    if args.local_device:
        connection_info: Any = {
            "driver_volume_type": "local",
            "data": {"device_path": args.local_device},
        }
    else:
        connection_info = _read_json(args.connection_info)
    body = {
        "volume_id": args.volume_id,
        "domain": args.domain,
        "connection_info": connection_info,
        "multiattach": args.multiattach,
        "mode": args.mode,
        "bus": args.bus,
        "target_dev": args.target_dev,
        "serial": args.serial,
        "incoming_migration": {"alias": args.incoming_alias} if args.incoming_alias else None,
    }
    try:
        request = AttachRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        raise CliError(describe_validation_error(exc)) from exc
    return request.model_dump(exclude_none=True)


def cmd_attach(client: HostagentClient, args: argparse.Namespace) -> int:
    status, attachment = client.request(
        "PUT", attachment_path(args.attachment_id), _attach_body(args)
    )
    if attachment["state"] == "incoming":
        _print(
            attachment,
            args.json,
            f"incoming: {attachment['attachment_id']} ready for {attachment['domain_uuid']} "
            f"to arrive with {attachment['alias']} ({attachment['connection_key']}, host "
            f"refcount {attachment['host_refcount']}); its disk here:\n{attachment['disk_xml']}",
        )
        return 0
    _print(
        attachment,
        args.json,
        f"{'attached' if status == 201 else 'already attached'}: "
        f"{attachment['attachment_id']} -> {attachment['domain_name']} "
        f"{attachment['target_dev']} ({attachment['connection_key']}, "
        f"host refcount {attachment['host_refcount']})",
    )
    return 0


def cmd_confirm(client: HostagentClient, args: argparse.Namespace) -> int:
    _, attachment = client.request("POST", attachment_path(args.attachment_id, "/confirm"))
    _print(
        attachment,
        args.json,
        f"attached: {attachment['attachment_id']} arrived with {attachment['domain_name']} "
        f"as {attachment['alias']} ({attachment['target_dev']})",
    )
    return 0


def cmd_detach(client: HostagentClient, args: argparse.Namespace) -> int:
    _, result = client.request("DELETE", attachment_path(args.attachment_id))
    _print(
        result,
        args.json,
        f"detached: {result['attachment_id']} ({result['connection_key']}, host refcount "
        f"{result['host_refcount']}); host_disconnected={_text(result['host_disconnected'])} "
        f"terminate_connection={_text(result['terminate_connection'])}",
    )
    return 0


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Bytes, or a number with K, M, G or T (binary units: 2G is 2 GiB)."""
    number, unit = text.strip().upper().removesuffix("B").removesuffix("I"), ""
    if number[-1:].isalpha():
        number, unit = number[:-1], number[-1]
    if unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: the units are K, M, G and T")
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2147483648 or 2G")
    return int(number) * _SIZE_UNITS[unit]


def cmd_extend(client: HostagentClient, args: argparse.Namespace) -> int:
    body = {} if args.new_size is None else {"new_size": args.new_size}
    _, result = client.request("POST", attachment_path(args.attachment_id, "/extend"), body)
    lines = [f"{result['connection_key']}: the host sees {result['device_size']} bytes"]
    lines += [
        f"  {g['domain_name']} ({g['attachment_id']}): {g['size']} bytes, "
        f"{'resized' if g['resized'] else 'already at size'}"
        for g in result["guests"]
    ]
    _print(result, args.json, "\n".join(lines))
    return 0


def _extend_command(read_command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    extend = read_command("extend", "the volume grew: make the host and every guest see it")
    extend.add_argument("attachment_id")
    extend.add_argument(
        "--new-size",
        type=parse_size,
        help="the new size (bytes, or 2G); required for rbd volumes QEMU opens itself",
    )


def cmd_show(client: HostagentClient, args: argparse.Namespace) -> int:
    attachment = _get(client, attachment_path(args.attachment_id))
    connection = next(
        (
            c
            for c in _get(client, "/v1/connections")["connections"]
            if c["connection_key"] == attachment["connection_key"]
        ),
        None,
    )
    view = _get(client, attachment_path(args.attachment_id, "/libvirt"))
    shown = {"attachment": attachment, "connection": connection, "libvirt": view}
    _print(shown, args.json, _show_text(attachment, connection, view))
    return 0


def _show_text(
    attachment: dict[str, Any], connection: dict[str, Any] | None, view: dict[str, Any]
) -> str:
    lines = [f"attachment {attachment['attachment_id']}"]
    lines += _fields(attachment, skip=("attachment_id", "disk_xml"))
    if connection is not None:
        lines.append(f"host connection {connection['connection_key']}")
        lines += _fields(connection, skip=("connection_key",))
    where = ""
    if not view["domain_exists"]:
        arriving = attachment["state"] == "incoming"
        where = " (not arrived yet)" if arriving else " (domain no longer exists)"
    lines.append(
        f"libvirt: domain {view['domain_name']}{where}, "
        f"{'running' if view['active'] else 'not running'}, "
        f"{'persistent' if view['persistent'] else 'transient'}"
    )
    disks = (
        ("live XML", view["live_disk_xml"], view["active"]),
        ("persistent config", view["config_disk_xml"], view["persistent"]),
    )
    for label, xml, present in disks:
        if present:
            lines.append(f"  {label}:")
            text = _evenly_indented(xml) if xml else ["(no disk with this alias)"]
            lines += [f"    {line}" for line in text]
    lines.append("the same in virsh:")
    lines += [f"  {command}" for command in view["virsh_commands"]]
    return "\n".join(lines)


def cmd_doctor(client: HostagentClient, args: argparse.Namespace) -> int:
    report = _get(client, "/v1/doctor")
    if report["ok"]:
        human = (
            f"ok: {report['attachments']} attachments, {report['connections']} host "
            f"connections and {report['domains']} domains agree"
        )
    else:
        human = "\n".join(
            f"{f['kind']}: {f['subject']}: {f['detail']}\n  try: {f['suggestion']}"
            for f in report["findings"]
        )
    _print(report, args.json, human)
    return 0 if report["ok"] else 1


def cmd_reconcile(client: HostagentClient, args: argparse.Namespace) -> int:
    _, report = client.request("POST", "/v1/reconcile")
    human = "\n".join(f"{a['action']}: {a['subject']}: {a['detail']}" for a in report["actions"])
    _print(report, args.json, human or "nothing to do: records, domains and devices agree")
    return 0


def cmd_connector(client: HostagentClient, args: argparse.Namespace) -> int:
    properties = _get(client, connector_path(args.target))
    human = "\n".join(f"{k}: {_text(v)}" for k, v in sorted(properties.items()))
    _print(properties, args.json, human)
    return 0


def cmd_xml(args: argparse.Namespace) -> int:
    # os-brick (through the connectors) is most of a second to import: only here.
    from hostagent.attachments.render import OfflineRenderError, render_disk_xml

    try:
        xml = render_disk_xml(
            _read_json(args.connection_info),
            attachment_id=args.attachment_id,
            serial=args.serial,
            multiattach=args.multiattach,
            mode=args.mode,
            bus=args.bus,
            target_dev=args.target_dev,
        )
    except OfflineRenderError as exc:
        raise CliError(str(exc)) from exc
    sys.stdout.write(xml)
    return 0


@functools.cache
def help_width() -> int:
    """The width argparse's help would take (``COLUMNS``, else the terminal's,
    else 80; less 2), found once. argparse asks again for each of the ~50
    formatters it makes while the parser is built, and imports shutil to ask:
    about 4 ms of a read command's start."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
            columns = 80
    return columns - 2


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=help_width())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hostagentctl", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--socket",
        default=default_socket(),
        help="daemon socket (default: $HOSTAGENT_SOCKET or %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def read_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, formatter_class=_HelpFormatter)
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    read_command("status", "daemon and libvirt health, counts")
    read_command("list", "attachments not yet detached")
    read_command("connections", "host connections and their users")

    attach = read_command("attach", "attach a volume to a guest")
    attach.add_argument("attachment_id")
    attach.add_argument("--volume-id", required=True)
    attach.add_argument("--domain", required=True, help="libvirt domain name or UUID")
    source = attach.add_mutually_exclusive_group(required=True)
    source.add_argument("--connection-info", help="Cinder connection_info JSON file ('-': stdin)")
    source.add_argument("--local-device", help="shorthand: a local block device path")
    _disk_options(attach)
    attach.add_argument("--serial")
    attach.add_argument(
        "--incoming-alias",
        help="live migration destination: connect for the domain (--domain UUID) arriving "
        "with this disk alias (the source agent's); nothing is added to libvirt",
    )

    confirm = read_command("confirm", "an incoming attachment whose domain arrived: attached")
    confirm.add_argument("attachment_id")

    detach = read_command("detach", "detach; prints terminate_connection")
    detach.add_argument("attachment_id")

    _extend_command(read_command)

    show = read_command("show", "an attachment, its host connection and its disk in libvirt")
    show.add_argument("attachment_id")
    read_command("doctor", "records vs libvirt vs host devices; exit 1 on any disagreement")
    connector = read_command("connector", "this host's connector properties for Cinder")
    connector.add_argument("--target", help="storage address: report the ip used to reach it")
    read_command("reconcile", "finish, roll back and release what records and libvirt disagree on")

    xml = read_command("xml", "render the disk XML offline (no daemon needed)")
    xml.add_argument(
        "--connection-info", required=True, help="Cinder connection_info JSON file ('-': stdin)"
    )
    xml.add_argument("--attachment-id", default="manual")
    xml.add_argument("--serial", default="manual")
    _disk_options(xml)
    return parser


def _disk_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--multiattach", action="store_true", help="shareable disk")
    p.add_argument("--mode", choices=("rw", "ro"), default="rw")
    p.add_argument("--bus", choices=("scsi", "virtio"), default="scsi")
    p.add_argument("--target-dev")


COMMANDS = {
    "status": cmd_status,
    "list": cmd_list,
    "connections": cmd_connections,
    "attach": cmd_attach,
    "detach": cmd_detach,
    "confirm": cmd_confirm,
    "show": cmd_show,
    "doctor": cmd_doctor,
    "reconcile": cmd_reconcile,
    "connector": cmd_connector,
    "extend": cmd_extend,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "xml":
            return cmd_xml(args)
        return COMMANDS[args.command](HostagentClient(args.socket), args)
    except ApiError as exc:
        print(f"hostagentctl: {exc}", file=sys.stderr)
    except (CliError, OSError, json.JSONDecodeError) as exc:
        print(f"hostagentctl: {str(exc).splitlines()[0]}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
