"""What refuses an attach once its id is checked, as API.md orders it.

``Store.begin_attach`` reads what the rules need and asks ``refusal`` inside
the one transaction that then records the intent, so two requests can never
both pass. The rules themselves read nothing: they are here, apart from the
SQL, so that one place says what conflicts with what.
"""

from __future__ import annotations

from collections.abc import Sequence

from hostagent.errors import (
    AttachmentIdReused,
    HostagentError,
    TargetDevInUse,
    VolumeAlreadyAttached,
    VolumeNotMultiattach,
)
from hostagent.state.records import AttachmentRecord


def refusal(
    attachment: AttachmentRecord,
    *,
    id_detached: bool,
    sharing: Sequence[AttachmentRecord],
    target_dev_taken: bool,
) -> HostagentError | None:
    """The error that refuses ``attachment``, or None, in API.md's order:

    - ``id_detached``: its id has a tombstone (ids are single-use);
    - ``sharing``: the other attachments of the same volume or connection; one
      on the same domain refuses it, and so does any when either side is not
      multiattach;
    - ``target_dev_taken``: the target dev it asks for is already recorded
      on its domain.
    """
    if id_detached:
        return AttachmentIdReused(
            f"attachment id {attachment.attachment_id} was already detached; "
            "use a fresh id for a new attach"
        )
    for other in sharing:
        if other.domain_uuid == attachment.domain_uuid:
            return VolumeAlreadyAttached(
                f"volume {other.volume_id} ({other.connection_key}) is already "
                f"attached to domain {other.domain_name} as {other.attachment_id}"
            )
    for other in sharing:
        if not (other.multiattach and attachment.multiattach):
            return VolumeNotMultiattach(
                f"{other.connection_key} is already attached on this host "
                f"({other.attachment_id} on {other.domain_name}); sharing needs "
                "multiattach on both attachments"
            )
    if target_dev_taken:
        return TargetDevInUse(
            f"target dev {attachment.target_dev} is already used on {attachment.domain_name}"
        )
    return None
