"""Credentials never leave: the one rule for showing a URL or a message that may hold one.

The state store's URL (``MLOC_DATABASE_URL``) usually carries the database password
(``postgresql+psycopg2://mloc:<password>@host/mloc``). Anything that leaves the process -- an
export's manifest, a log line, Dagster metadata, an error message -- shows it through
``redact_url`` (one URL) or ``redact`` (free text that may contain URLs or ``password=...``
pairs): the password becomes ``***``; user, host, port, database and options stay, so the
reader still knows which database is meant.
"""

from __future__ import annotations

import re

MASK = "***"
# Query options and key=value pairs whose value is a secret (libpq's password=, tokens, keys).
SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "access_key", "secret_key")

# scheme://user:password@host -- the password runs to the last "@" of the URL: an unescaped "@" or
# "/" inside a password is a user's mistake, but must not leak either.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):(?P<password>\S*)@")
_PAIR = re.compile(r"(?P<key>\b(?:" + "|".join(SECRET_KEYS) + r")[\"']?)(?P<sep>\s*[=:]\s*)"
                   r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s&;,'\"]+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password (and secret query options such as ``?password=``) replaced by
    ``***``; user, host, port, database and the other options stay."""
    return redact(url)


def redact(text: str) -> str:
    """Free text with the password of every URL in it, and every ``password=...`` value, masked."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _PAIR.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)
