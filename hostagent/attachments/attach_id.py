"""The attachment id as API.md's idempotency key, shared by every kind of PUT."""

from __future__ import annotations

from hostagent.errors import AttachmentConflict, AttachmentIdReused
from hostagent.state.store import AttachmentRecord, AttachmentState, Store


def repeated_attach(store: Store, attachment_id: str, digest: str) -> AttachmentRecord | None:
    """The attachment a PUT repeats (same id, same request), or None for a new
    id. AttachmentConflict for the id under another request or being detached;
    AttachmentIdReused for an id whose detach finished. Caller holds its lock."""
    existing = store.get_attachment(attachment_id)
    if existing is None:
        if store.get_tombstone(attachment_id) is not None:
            raise AttachmentIdReused(
                f"attachment id {attachment_id} was already detached; "
                "use a fresh id for a new attach"
            )
        return None
    if existing.request_hash != digest:
        raise AttachmentConflict(f"attachment {attachment_id} exists with a different request")
    if existing.state is AttachmentState.DETACHING:
        raise AttachmentConflict(f"attachment {attachment_id} is being detached")
    return existing
