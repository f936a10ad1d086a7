"""The refusals of an attach, in API.md's order, without sqlite (the store's
own tests show they are checked in the intent's transaction)."""

from __future__ import annotations

from hostagent.errors import (
    AttachmentIdReused,
    TargetDevInUse,
    VolumeAlreadyAttached,
    VolumeNotMultiattach,
)
from hostagent.state.attach_rules import refusal
from tests.unit.test_store import attachment

NEW = attachment("a-new", domain="dom-1", target_dev="sdb")


def test_nothing_in_the_way_is_no_refusal() -> None:
    other = attachment("a-other", domain="dom-2")
    assert refusal(NEW, id_detached=False, sharing=[other], target_dev_taken=False) is None


def test_a_detached_id_is_refused_before_anything_else() -> None:
    same_domain = attachment("a-other", domain="dom-1")
    refused = refusal(NEW, id_detached=True, sharing=[same_domain], target_dev_taken=True)
    assert isinstance(refused, AttachmentIdReused)


def test_the_volume_on_the_same_domain_is_told_before_a_sharing_refused() -> None:
    """A caller who attaches twice to one guest learns that, whatever else
    shares the volume."""
    not_multiattach = attachment("a-2", domain="dom-2", multiattach=False)
    same_domain = attachment("a-1", domain="dom-1")
    refused = refusal(
        NEW, id_detached=False, sharing=[not_multiattach, same_domain], target_dev_taken=True
    )
    assert isinstance(refused, VolumeAlreadyAttached)
    assert "as a-1" in str(refused)


def test_sharing_needs_multiattach_on_both_sides() -> None:
    plain = attachment("a-new", domain="dom-1", multiattach=False)
    shared = attachment("a-2", domain="dom-2", multiattach=True)
    assert isinstance(
        refusal(plain, id_detached=False, sharing=[shared], target_dev_taken=False),
        VolumeNotMultiattach,
    )
    assert isinstance(
        refusal(
            NEW,
            id_detached=False,
            sharing=[attachment("a-3", domain="dom-3", multiattach=False)],
            target_dev_taken=False,
        ),
        VolumeNotMultiattach,
    )


def test_a_target_dev_taken_is_refused_last() -> None:
    refused = refusal(NEW, id_detached=False, sharing=[], target_dev_taken=True)
    assert isinstance(refused, TargetDevInUse)
    assert str(refused) == "target dev sdb is already used on name-dom-1"
