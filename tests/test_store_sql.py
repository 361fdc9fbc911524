"""The shared SQL layer: every statement renders in each dialect, and driver exceptions
map to the store's errors."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import fields

import psycopg
import pytest
from psycopg import errors as pg_errors

from nexus.store import ConstraintViolation, StoreError, StoreUnavailable, sql
from nexus.store import postgres as pg_backend
from nexus.store import sqlite as sqlite_backend


def _all_sql(statements: sql.Statements,
             migrations: tuple[tuple[str, ...], ...]) -> list[str]:
    return [getattr(statements, f.name) for f in fields(statements)] + [
        s for step in migrations for s in step]


@pytest.mark.parametrize("backend", [sqlite_backend, pg_backend], ids=["sqlite", "postgres"])
def test_every_statement_is_rendered_in_its_dialect(backend: object) -> None:
    statements: sql.Statements = backend.STATEMENTS  # type: ignore[attr-defined]
    migrations: tuple[tuple[str, ...], ...] = backend.MIGRATIONS  # type: ignore[attr-defined]
    assert backend.SCHEMA_VERSION == sql.SCHEMA_VERSION == len(migrations)  # type: ignore[attr-defined]
    for text in _all_sql(statements, migrations):
        assert "{" not in text and "}" not in text, text  # every word filled in
        if backend is pg_backend:
            assert "?" not in text, text
            # psycopg reads every % as a placeholder: only %s may appear.
            assert re.sub(r"%s", "", text).count("%") == 0, text
        else:
            assert "%s" not in text, text


def test_the_dialects_differ_only_in_their_words() -> None:
    lite, pg = sqlite_backend.STATEMENTS, pg_backend.STATEMENTS
    assert lite.put_state == ("INSERT INTO state (key, value) VALUES (?, ?)"
                              " ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    assert pg.put_state == lite.put_state.replace("?", "%s")
    assert lite.lock_meta.endswith("WHERE path = ?")
    assert pg.lock_meta.endswith("WHERE path = %s FOR UPDATE")
    assert "destroyed = 0" in lite.undelete_version
    assert "destroyed = FALSE" in pg.undelete_version
    assert 'TEXT COLLATE "C"' in pg_backend.MIGRATIONS[0][0]
    assert "WITHOUT ROWID" in sqlite_backend.MIGRATIONS[0][0]


def test_prefix_upper_bound() -> None:
    assert sql.prefix_upper_bound("") is None
    assert sql.prefix_upper_bound("a/") == "a0"
    assert sql.prefix_upper_bound("x\U0010ffff") is None
    assert sql.prefix_upper_bound("x\ud7ff") is None


@pytest.mark.parametrize(("driver", "exc", "expected"), [
    (sqlite_backend.DRIVER_ERRORS, sqlite3.OperationalError("database is locked"),
     StoreUnavailable),
    (sqlite_backend.DRIVER_ERRORS, sqlite3.IntegrityError("UNIQUE constraint failed"),
     ConstraintViolation),
    (sqlite_backend.DRIVER_ERRORS, sqlite3.InterfaceError("bad parameter"), StoreError),
    (sqlite_backend.DRIVER_ERRORS, sqlite3.ProgrammingError("closed database"), StoreError),
    (pg_backend.DRIVER_ERRORS, psycopg.OperationalError("connection refused"),
     StoreUnavailable),
    (pg_backend.DRIVER_ERRORS, pg_errors.ReadOnlySqlTransaction("read-only"),
     StoreUnavailable),
    (pg_backend.DRIVER_ERRORS, pg_errors.UniqueViolation("duplicate key\nDETAIL: (a)=(b)"),
     ConstraintViolation),
    (pg_backend.DRIVER_ERRORS, pg_errors.SyntaxError("syntax error"), StoreError),
], ids=["lite-locked", "lite-integrity", "lite-interface", "lite-closed", "pg-down",
        "pg-read-only", "pg-integrity", "pg-other"])
def test_driver_exceptions_become_store_errors(
        driver: sql.DriverErrors, exc: Exception, expected: type[StoreError]) -> None:
    with pytest.raises(StoreError) as info, sql.translated(driver):
        raise exc
    assert type(info.value) is expected
    assert info.value.__cause__ is exc
    assert str(info.value).startswith(f"{driver.name}: ")
    assert "DETAIL" not in str(info.value)


def test_store_errors_and_other_exceptions_pass_through() -> None:
    with pytest.raises(StoreUnavailable, match=r"^store is closed$"), \
            sql.translated(sqlite_backend.DRIVER_ERRORS):
        raise StoreUnavailable("store is closed")
    with pytest.raises(RuntimeError, match="seal failed"), \
            sql.translated(pg_backend.DRIVER_ERRORS):
        raise RuntimeError("seal failed")
