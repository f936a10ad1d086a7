"""Cinder's ``qos_specs`` as a guest disk's ``<iotune>``, the way nova maps them.

Cinder sends the specs of a front-end (or ``both``) QoS in
``connection_info.data.qos_specs``, values often as decimal strings, per-GB
forms already resolved. Keys libvirt has no element for (a back-end's own,
the per-GB forms) are ignored and logged; a key it maps must carry a
non-negative integer, or the attach is refused before anything is touched.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Final

from hostagent.libvirt_xml.disk import IoTune
from hostagent.libvirt_xml.policy import DiskPolicyError

LOG = logging.getLogger(__name__)

# Cinder's keys and libvirt's <iotune> elements share their names.
MAPPED_KEYS: Final = frozenset(f.name for f in dataclasses.fields(IoTune))
# The largest limit QEMU takes (its throttle values are int64).
MAX_LIMIT: Final = 2**63 - 1
_BACK_END = "back-end"
_NOT_LIMITS = frozenset({"consumer"})
_DECIMAL = re.compile(r"[0-9]{1,19}")


def _limit(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise DiskPolicyError(
            f"connection_info.data.qos_specs.{key} must be a non-negative integer, not {value!r}"
        )
    if not 0 <= number <= MAX_LIMIT:
        raise DiskPolicyError(
            f"connection_info.data.qos_specs.{key} must be from 0 to {MAX_LIMIT}, not {number}"
        )
    return number


def iotune_from_qos_specs(qos_specs: object) -> IoTune | None:
    """The ``<iotune>`` for Cinder's ``qos_specs`` (None: no limits for the
    hypervisor); raise DiskPolicyError for a mapped key's bad value."""
    if qos_specs is None:
        return None
    if not isinstance(qos_specs, Mapping):
        raise DiskPolicyError("connection_info.data.qos_specs must be an object")
    if qos_specs.get("consumer") == _BACK_END:
        return None  # enforced by the storage, not by QEMU
    limits = {key: _limit(key, value) for key, value in qos_specs.items() if key in MAPPED_KEYS}
    ignored = sorted(str(key) for key in qos_specs if key not in MAPPED_KEYS | _NOT_LIMITS)
    if ignored:
        LOG.info("qos_specs: ignoring keys libvirt has no limit for: %s", ", ".join(ignored))
    return IoTune(**limits) if limits else None
