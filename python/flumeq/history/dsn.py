"""PostgreSQL connection strings: shown with the password masked, and
connections opened with errors that name the server (``flumeq[postgres]``)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError, FlumeqError
from ..extras import require

__all__ = ["HistoryUnavailable", "connect", "masked"]

#: How long opening a connection may take, seconds.
CONNECT_TIMEOUT = 5


class HistoryUnavailable(FlumeqError, ConnectionError):
    """PostgreSQL could not be reached, or refused the connection."""


_URL_PASSWORD = re.compile(r"^(postgres(?:ql)?://[^:/@]*:)([^@]*)(@)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&]*)", re.IGNORECASE)


def masked(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (URL or key=value form)."""
    shown = _URL_PASSWORD.sub(r"\1***\3", dsn)
    shown = _QUERY_PASSWORD.sub(r"\1***", shown)
    return _KEYWORD_PASSWORD.sub(r"\1***", shown)


def checked(dsn: Any) -> str:
    """``dsn`` when it is a connection string psycopg can parse; else a
    ``ConfigError`` naming it (masked)."""
    require("postgres", "task history")
    import psycopg  # noqa: PLC0415

    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigError(f"history must be a PostgreSQL connection string, got {dsn!r}")
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as error:
        raise ConfigError(
            f"history DSN {masked(dsn)!r} is not a valid PostgreSQL connection string: "
            f"{_first_line(error)}"
        ) from None
    return dsn


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def connect(dsn: str, autocommit: bool = False) -> Any:
    """A psycopg connection to ``dsn``; ``HistoryUnavailable`` naming the
    server (password masked) and why, when it cannot be had."""
    import psycopg  # noqa: PLC0415

    try:
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="flumeq",
        )
    except psycopg.Error as error:
        raise HistoryUnavailable(
            f"cannot connect to the history database {masked(dsn)}: {_first_line(error)}"
        ) from None
