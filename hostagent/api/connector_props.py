"""``GET /v1/connector``: this host's os-brick connector properties for Cinder.

The ``ip`` is chosen by a route lookup toward the storage address the caller
names (``?target=IP``), else the configured ``my_ip``, else the source of the
default route; ``host`` is the configured stable host name. os-brick adds
what the host has: the iSCSI initiator name from
``/etc/iscsi/initiatorname.iscsi``, NVMe identity, multipath; in krbd mode
``do_local_attach`` is true.
"""

from __future__ import annotations

import logging
from typing import Any

from os_brick.initiator import connector as brick_connector

from hostagent.api.models import ConnectorProperties
from hostagent.errors import InvalidRequest
from hostagent.host.netinfo import NetinfoError, choose_initiator_ip

LOG = logging.getLogger(__name__)


def connector_properties(
    *,
    target: str | None,
    host: str,
    my_ip: str | None,
    multipath: bool = False,
    rbd_local_attach: bool = False,
) -> ConnectorProperties:
    try:
        ip = choose_initiator_ip(target, configured=my_ip)
    except NetinfoError as exc:
        raise InvalidRequest(str(exc)) from None
    properties: dict[str, Any] = brick_connector.get_connector_properties(
        None, ip, multipath, False, host=host
    )
    if rbd_local_attach:  # krbd: Cinder must export for a kernel map, not for librbd
        properties["do_local_attach"] = True
    LOG.debug("connector properties for target %s: %s", target, properties)
    return ConnectorProperties.model_validate(properties)
