"""logctx's SecretFilter: what reaches a log line from connection_info is masked."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from oslo_log import formatters

from hostagent.daemon.conf import load_config
from hostagent.observability.logctx import SecretFilter, install_filters, mask_secrets

KEY = "AQBxk0ZnAAAAABAAwzE0y1qNH3Ue8XaOBkN/3Pw=="  # a cephx key's shape
PASSWORD = "Chap-Pa55-Never-Logged"


@pytest.mark.parametrize(
    "text",
    [
        f"{{'key': '{KEY}', 'name': 'volumes/v1'}}",
        f'{{"key": "{KEY}"}}',
        f"[client.cinder]\n\tkey = {KEY}\n",
        repr({"keyring": f"[client.cinder]\n\tkey = {KEY}\n"}),
        f"key: {KEY}",
        "{'auth_password': 'hunter2-chap'}",
        f"Running cmd (subprocess): rbd map volumes/v1 --id cinder --key {KEY} --mon_host a:6789",
        f"rbd map volumes/v1 --key\t{KEY}",
        repr(["rbd", "map", "volumes/v1", "--id", "cinder", "--key", KEY]),
        f"{{'Key': '{KEY}'}}",
        f"KEY={KEY}",
        f"Keyring = {KEY}",
        f"key=b'{KEY}'",
        repr({"key": KEY.encode()}),
    ],
    ids=[
        "dict-repr",
        "json",
        "keyring-text",
        "keyring-in-a-repr",
        "yaml-ish",
        "chap",
        "rbd-argv-key-space",
        "rbd-argv-key-tab",
        "rbd-argv-list-repr",
        "title-case",
        "upper-case",
        "keyring-title-case",
        "bytes-repr",
        "bytes-in-a-dict-repr",
    ],
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
        "Connection_Key=rbd:ceph/volumes/volume-1",
        "VOLUME_KEY=vol-1",
        "volume_key=b'vol-1'",
        "rbd map volumes/v1 --keyring /etc/ceph/ceph.client.cinder.keyring",
        "the key is not in the keyring",
        f"connection_key {KEY}",
        f"MONKEY = {KEY}",
        "multipath key 36001405d8a8b6b1c2c34a4f9a2b1c0d9",
        "rbd map volumes/v1 --keyring /etc/ceph/keyrings/client/cinder/keyring",
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


def _log_a_chained_failure(logger: logging.Logger) -> None:
    """LOG.exception of an error whose text, and whose cause's, carry secrets."""
    try:
        try:
            raise OSError(f"Command: rbd map volumes/v1 --id cinder --key {KEY}\nExit code: 1")
        except OSError as exc:
            raise RuntimeError(f"connect failed (password={PASSWORD}): {exc}") from exc
    except RuntimeError:
        logger.exception("attach %s failed", "a1")


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, logging.StreamHandler[io.StringIO]]]:
    """A logger of its own writing to a string."""
    logger = logging.getLogger(f"hostagent.test_logctx.{id(object())}")
    logger.propagate = False
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def test_the_filter_masks_the_traceback_of_log_exception(
    logged: tuple[logging.Logger, logging.StreamHandler[io.StringIO]],
) -> None:
    logger, handler = logged
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(SecretFilter())
    _log_a_chained_failure(logger)
    out = handler.stream.getvalue()
    assert "ERROR attach a1 failed\nTraceback" in out
    assert "--key ***" in out and "password=***" in out
    assert KEY not in out and PASSWORD not in out


def test_the_daemons_formatter_writes_no_secret_of_log_exception(
    logged: tuple[logging.Logger, logging.StreamHandler[io.StringIO]],
) -> None:
    """oslo.log's ContextFormatter (hostagentd's) formats the traceback again from
    exc_info and appends the exception's first line: install_filters masks both."""
    logger, handler = logged
    handler.setFormatter(formatters.ContextFormatter(config=load_config([])))
    install_filters(logger)
    _log_a_chained_failure(logger)
    out = handler.stream.getvalue()
    assert "attach a1 failed: RuntimeError: connect failed (password=***" in out
    assert "Traceback" in out and "--key ***" in out
    assert KEY not in out and PASSWORD not in out


def test_a_warning_inside_a_handler_is_masked_where_oslo_appends_the_exception(
    logged: tuple[logging.Logger, logging.StreamHandler[io.StringIO]],
) -> None:
    """oslo.log appends the first line of the exception being handled to a
    WARNING logged without exc_info: the line is masked again then."""
    logger, handler = logged
    handler.setFormatter(formatters.ContextFormatter(config=load_config([])))
    install_filters(logger)
    try:
        raise RuntimeError(f"connect failed (password={PASSWORD})")
    except RuntimeError:
        logger.warning("attach a1 failed; rolling back")
    logger.warning("attach a1: --key %s", KEY)  # no exception: masked once, by the filter
    out = handler.stream.getvalue()
    assert "rolling back: RuntimeError: connect failed (password=***" in out
    assert "attach a1: --key ***" in out
    assert KEY not in out and PASSWORD not in out
