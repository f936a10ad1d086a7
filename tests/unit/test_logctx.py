"""logctx's SecretFilter: what reaches a log line from connection_info is masked."""

from __future__ import annotations

import logging

import pytest

from hostagent.logctx import SecretFilter, mask_secrets

KEY = "AQBxk0ZnAAAAABAAwzE0y1qNH3Ue8XaOBkN/3Pw=="  # a cephx key's shape


@pytest.mark.parametrize(
    "text",
    [
        f"{{'key': '{KEY}', 'name': 'volumes/v1'}}",
        f'{{"key": "{KEY}"}}',
        f"[client.cinder]\n\tkey = {KEY}\n",
        repr({"keyring": f"[client.cinder]\n\tkey = {KEY}\n"}),
        f"key: {KEY}",
        "{'auth_password': 'hunter2-chap'}",
    ],
    ids=["dict-repr", "json", "keyring-text", "keyring-in-a-repr", "yaml-ish", "chap"],
)
def test_keys_and_passwords_are_masked(text: str) -> None:
    masked = mask_secrets(text)
    assert KEY not in masked and "hunter2-chap" not in masked
    assert "***" in masked


@pytest.mark.parametrize(
    "text",
    [
        "connection_key=rbd:ceph/volumes/volume-1",
        "secret_uuid: 7d7c3e7e-0000-4000-8000-00000000abcd",
        "monkey = 5",
        "attachment a1: volume v1 detached; local:/dev/loop3 refcount 0",
    ],
)
def test_what_only_names_a_secret_is_left_alone(text: str) -> None:
    assert mask_secrets(text) == text


def test_the_filter_rewrites_the_record_once_formatted() -> None:
    record = logging.LogRecord(
        "hostagent", logging.INFO, __file__, 1, "connect %s", ({"key": KEY},), None
    )
    assert SecretFilter().filter(record)
    assert KEY not in record.getMessage() and "'key': '***'" in record.getMessage()
