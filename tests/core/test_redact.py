"""core/redact.py: no password survives, and what identifies the database stays readable."""

from __future__ import annotations

import pytest

from mloc_dagster.core.redact import redact, redact_url
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import StateStoreUnavailable


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg2://mloc:hunter2@db.internal:5432/mloc?sslmode=require",
     "postgresql+psycopg2://mloc:***@db.internal:5432/mloc?sslmode=require"),
    ("postgresql://mloc:hun%40ter2@db/mloc", "postgresql://mloc:***@db/mloc"),
    ("postgresql://mloc:hun@ter/2@db/mloc", "postgresql://mloc:***@db/mloc"),  # unescaped: still hidden
    ("postgresql://db/mloc?user=mloc&password=hunter2", "postgresql://db/mloc?user=mloc&password=***"),
    ("postgresql://:hunter2@db/mloc", "postgresql://:***@db/mloc"),
    ("postgresql://mloc@db/mloc", "postgresql://mloc@db/mloc"),
    ("sqlite:////var/lib/mloc/state.db", "sqlite:////var/lib/mloc/state.db"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_text_with_urls_and_pairs():
    text = ("cannot connect to postgresql+psycopg2://mloc:hunter2@db/mloc (dsn: host=db password=hunter2 "
            "user=mloc); mirror https://ci:tok3n@git.example/x.git; {\"password\": \"hunter2\"} at 12:30 as user@db")
    shown = redact(text)
    assert "hunter2" not in shown and "tok3n" not in shown
    assert "postgresql+psycopg2://mloc:***@db/mloc" in shown and "host=db password=*** user=mloc" in shown
    assert "https://ci:***@git.example/x.git" in shown and "at 12:30 as user@db" in shown


def test_a_store_that_cannot_be_opened_names_its_url_without_the_password():
    with pytest.raises(StateStoreUnavailable) as err:
        StateStore("postgresql+psycopg2://mloc:hunter2@127.0.0.1:1/mloc")
    assert "hunter2" not in str(err.value) and err.value.__cause__ is None
    assert "postgresql+psycopg2://mloc:***@127.0.0.1:1/mloc" in str(err.value)
