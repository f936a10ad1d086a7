"""hostagentctl: a thin command line over the v1 API (plus offline ``xml``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from hostagent.api.models import AttachRequest, describe_validation_error
from hostagent.attachments.render import OfflineRenderError, render_disk_xml
from hostagent.client import ApiError, HostagentClient, default_socket

EXIT_ERROR = 2


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(c).upper() for c in columns]]
    cells += [["-" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _print(data: BaseModel | Sequence[BaseModel], as_json: bool, human: str) -> None:
    if as_json:
        if not isinstance(data, BaseModel):
            print(json.dumps([d.model_dump(mode="json") for d in data], indent=2))
        else:
            print(data.model_dump_json(indent=2))
    else:
        print(human)


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


def cmd_status(client: HostagentClient, args: argparse.Namespace) -> int:
    health = client.health()
    attachments = client.list()
    connections = client.connections().connections
    if args.json:
        print(
            json.dumps(
                {
                    "health": health.model_dump(),
                    "attachments": len(attachments),
                    "connections": len(connections),
                },
                indent=2,
            )
        )
    else:
        print(f"hostagentd {health.version}: {health.status} (libvirt {health.libvirt})")
        print(f"socket: {client.socket_path}")
        print(f"attachments: {len(attachments)}   host connections: {len(connections)}")
    return 0 if health.status == "ok" else 1


def cmd_list(client: HostagentClient, args: argparse.Namespace) -> int:
    attachments = client.list()
    _print(
        attachments, args.json, _table([a.model_dump() for a in attachments], ATTACHMENT_COLUMNS)
    )
    return 0


def cmd_connections(client: HostagentClient, args: argparse.Namespace) -> int:
    connections = client.connections()
    rows = [
        dict(c.model_dump(), attachments=",".join(c.attachments) or "-")
        for c in connections.connections
    ]
    _print(
        connections,
        args.json,
        _table(
            rows,
            (
                "connection_key",
                "driver_volume_type",
                "device_path",
                "state",
                "host_refcount",
                "attachments",
                "connected_at",
            ),
        ),
    )
    return 0


def _attach_request(args: argparse.Namespace) -> AttachRequest:
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
    return AttachRequest.model_validate({k: v for k, v in body.items() if v is not None})


def cmd_attach(client: HostagentClient, args: argparse.Namespace) -> int:
    attachment, created = client.attach(args.attachment_id, _attach_request(args))
    if attachment.state == "incoming":
        _print(
            attachment,
            args.json,
            f"incoming: {attachment.attachment_id} ready for {attachment.domain_uuid} to "
            f"arrive with {attachment.alias} ({attachment.connection_key}, host refcount "
            f"{attachment.host_refcount}); its disk here:\n{attachment.disk_xml}",
        )
        return 0
    _print(
        attachment,
        args.json,
        f"{'attached' if created else 'already attached'}: {attachment.attachment_id} "
        f"-> {attachment.domain_name} {attachment.target_dev} "
        f"({attachment.connection_key}, host refcount {attachment.host_refcount})",
    )
    return 0


def cmd_confirm(client: HostagentClient, args: argparse.Namespace) -> int:
    attachment = client.confirm(args.attachment_id)
    _print(
        attachment,
        args.json,
        f"attached: {attachment.attachment_id} arrived with {attachment.domain_name} as "
        f"{attachment.alias} ({attachment.target_dev})",
    )
    return 0


def cmd_detach(client: HostagentClient, args: argparse.Namespace) -> int:
    result = client.detach(args.attachment_id)
    _print(
        result,
        args.json,
        f"detached: {result.attachment_id} ({result.connection_key}, host refcount "
        f"{result.host_refcount}); host_disconnected={str(result.host_disconnected).lower()} "
        f"terminate_connection={str(result.terminate_connection).lower()}",
    )
    return 0


def cmd_show(client: HostagentClient, args: argparse.Namespace) -> int:
    attachment = client.get(args.attachment_id)
    connection = next(
        (
            c
            for c in client.connections().connections
            if c.connection_key == attachment.connection_key
        ),
        None,
    )
    view = client.libvirt_view(args.attachment_id)
    if args.json:
        print(
            json.dumps(
                {
                    "attachment": attachment.model_dump(mode="json"),
                    "connection": connection.model_dump(mode="json") if connection else None,
                    "libvirt": view.model_dump(mode="json"),
                },
                indent=2,
            )
        )
        return 0
    lines = [f"attachment {attachment.attachment_id}"]
    lines += [
        f"  {k}: {v}"
        for k, v in attachment.model_dump().items()
        if k not in ("attachment_id", "disk_xml")
    ]
    if connection is not None:
        lines.append(f"host connection {connection.connection_key}")
        lines += [
            f"  {k}: {v}" for k, v in connection.model_dump().items() if k != "connection_key"
        ]
    where = ""
    if not view.domain_exists:
        arriving = attachment.state == "incoming"
        where = " (not arrived yet)" if arriving else " (domain no longer exists)"
    lines.append(
        f"libvirt: domain {view.domain_name}{where}, "
        f"{'running' if view.active else 'not running'}, "
        f"{'persistent' if view.persistent else 'transient'}"
    )
    for label, xml in (
        ("live XML", view.live_disk_xml),
        ("persistent config", view.config_disk_xml),
    ):
        if (view.active and label == "live XML") or (view.persistent and label != "live XML"):
            lines.append(f"  {label}:")
            lines += [f"    {line}" for line in (xml or "(no disk with this alias)").splitlines()]
    lines.append("the same in virsh:")
    lines += [f"  {command}" for command in view.virsh_commands]
    print("\n".join(lines))
    return 0


def cmd_doctor(client: HostagentClient, args: argparse.Namespace) -> int:
    report = client.doctor()
    if args.json:
        print(report.model_dump_json(indent=2))
    elif report.ok:
        print(
            f"ok: {report.attachments} attachments, {report.connections} host connections "
            f"and {report.domains} domains agree"
        )
    else:
        for finding in report.findings:
            print(f"{finding.kind}: {finding.subject}: {finding.detail}")
            print(f"  try: {finding.suggestion}")
    return 0 if report.ok else 1


def cmd_reconcile(client: HostagentClient, args: argparse.Namespace) -> int:
    report = client.reconcile()
    if args.json:
        print(report.model_dump_json(indent=2))
    elif not report.actions:
        print("nothing to do: records, domains and devices agree")
    else:
        for action in report.actions:
            print(f"{action.action}: {action.subject}: {action.detail}")
    return 0


def cmd_connector(client: HostagentClient, args: argparse.Namespace) -> int:
    properties = client.connector(args.target)
    data = properties.model_dump(mode="json")
    _print(properties, args.json, "\n".join(f"{k}: {v}" for k, v in sorted(data.items())))
    return 0


def cmd_xml(args: argparse.Namespace) -> int:
    sys.stdout.write(
        render_disk_xml(
            _read_json(args.connection_info),
            attachment_id=args.attachment_id,
            serial=args.serial,
            multiattach=args.multiattach,
            mode=args.mode,
            bus=args.bus,
            target_dev=args.target_dev,
        )
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hostagentctl", description=__doc__)
    parser.add_argument(
        "--socket",
        default=default_socket(),
        help="daemon socket (default: $HOSTAGENT_SOCKET or %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def read_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
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
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "xml":
            return cmd_xml(args)
        return COMMANDS[args.command](HostagentClient(args.socket), args)
    except ApiError as exc:
        print(f"hostagentctl: {exc}", file=sys.stderr)
    except ValidationError as exc:
        print(f"hostagentctl: {describe_validation_error(exc)}", file=sys.stderr)
    except (OfflineRenderError, OSError, json.JSONDecodeError) as exc:
        print(f"hostagentctl: {str(exc).splitlines()[0]}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
