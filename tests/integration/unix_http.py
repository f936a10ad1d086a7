"""A requests Session that talks HTTP over a unix socket (for schemathesis)."""

from __future__ import annotations

import socket
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

BASE_URL = "http://hostagent"


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        self._unix_path = path
        super().__init__("localhost", *args, **kwargs)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if isinstance(self.timeout, int | float) else None)
        sock.connect(self._unix_path)
        self.sock = sock


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self._unix_path = path

    def _new_conn(self) -> HTTPConnection:
        return _UnixConnection(self._unix_path, timeout=self.timeout.connect_timeout)


class UnixAdapter(HTTPAdapter):
    def __init__(self, path: str, **kwargs: Any) -> None:
        self._unix_path = path
        super().__init__(**kwargs)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> _UnixPool:
        return _UnixPool(self._unix_path)


def unix_session(path: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies from the environment
    session.mount(BASE_URL + "/", UnixAdapter(path))
    return session
