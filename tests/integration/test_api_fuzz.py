"""schemathesis against the live daemon: no 5xx, every answer matches the
OpenAPI document, and nothing a rejected request asked for reaches libvirt."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from tests.integration.support import Daemon, Guests, ReconnectingConnection
from tests.integration.unix_http import BASE_URL, unix_session

OPENAPI = Path(__file__).parents[2] / "docs" / "openapi.json"
loaded = schemathesis.openapi.from_path(str(OPENAPI))
loaded.config.update(base_url=BASE_URL)
# Reconcile acts on the host by design; everything else must leave it alone.
schema = loaded.exclude(path="/v1/reconcile")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One daemon for the whole module, and a guest whose XML must not change."""
    base = Path(str(tmp_path_factory.mktemp("fz", numbered=True)))
    short = Path("/tmp") / f"hafz-{base.name}"
    short.mkdir(exist_ok=True)
    daemon = Daemon(short / "state", short / "d.sock", short / "log")
    daemon.start()
    guests = Guests(ReconnectingConnection())
    guest = guests.make()
    try:
        yield {
            "daemon": daemon,
            "guest": guest,
            "session": unix_session(str(daemon.socket_path)),
            "before": guest.dom.XMLDesc(0),
        }
    finally:
        assert daemon.stop() == 0
        guests.cleanup()


def state_rows(daemon: Daemon) -> list[Any]:
    with sqlite3.connect(daemon.state_dir / "hostagent.sqlite3") as db:
        return [
            db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608
            for t in ("attachments", "connections", "tombstones")
        ]


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_openapi(case: schemathesis.Case[Any], fuzzed: dict[str, Any]) -> None:
    session: requests.Session = fuzzed["session"]
    # A schema-valid body may still be refused for what the schema cannot say
    # (no such domain, no such device, an unknown protocol): 400/404 is the
    # right answer there, so "valid data accepted" is not a check here.
    case.call_and_validate(
        session=session, excluded_checks=[schemathesis.checks.positive_data_acceptance]
    )


def test_fuzzing_changed_nothing(fuzzed: dict[str, Any]) -> None:
    daemon: Daemon = fuzzed["daemon"]
    assert state_rows(daemon) == [0, 0, 0]
    assert fuzzed["guest"].dom.XMLDesc(0) == fuzzed["before"]
    assert "internal_error" not in daemon.log()
