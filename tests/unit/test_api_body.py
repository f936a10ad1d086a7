"""Reading a request body: a client that stalls half way gets 408."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from hostagent.api import middlewares as api


class StalledBody:
    """A request whose body never finishes arriving."""

    async def read(self) -> bytes:
        await asyncio.sleep(60)
        return b""


def test_a_body_that_stops_arriving_is_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "BODY_TIMEOUT_SECONDS", 0.05)
    with pytest.raises(web.HTTPRequestTimeout) as timed_out:
        asyncio.run(api.read_body(StalledBody()))  # type: ignore[arg-type]
    assert timed_out.value.text == "the request body did not arrive within 0.05s"
