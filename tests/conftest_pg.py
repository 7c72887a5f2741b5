"""A real PostgreSQL server for the test suite, started with pytest-postgresql.

Loaded as a pytest plugin (``pytest_plugins = ["tests.conftest_pg"]`` in tests/conftest.py).

Fixtures:
- ``pg_server`` (session): one throw-away PostgreSQL cluster for the whole session.
- ``postgres_url`` (function): a fresh, empty database on it, as a SQLAlchemy URL
  (``postgresql+psycopg2://postgres@127.0.0.1:<port>/<db>``); dropped after the test.
  ``pg_server.url(db, driver="")`` gives the plain ``postgresql://`` form (dagster-postgres), and
  ``fresh_database(pg_server)`` creates further databases.
- ``state_url`` (function, parametrized ``sqlite`` / ``postgres``): the URL a ``StateStore``
  test runs against, so every state test runs on both back-ends.

Why not pytest-postgresql's ready-made ``postgresql_proc`` fixture: it puts the data directory
under pytest's basetemp (mode 0700, owned by the caller), and when the suite runs as root -- CI
containers, fresh machines -- initdb refuses to run as root at all. So we start the same
``PostgreSQLExecutor`` ourselves with ``scripts/pg_ctl_as_postgres`` as its pg_ctl (which drops
to the ``postgres`` account when we are root) and a data/socket directory that account owns.

No Postgres binaries at all -> the Postgres-backed tests skip with the reason, unless
``MLOC_REQUIRE_POSTGRES=1`` (set it in CI) turns that into an error.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_CTL_WRAPPER = REPO_ROOT / "scripts" / "pg_ctl_as_postgres"
# Durability is worthless for a throw-away test cluster and costs seconds on every commit.
_FAST_POSTGRES_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
NO_BINARIES = ("no PostgreSQL server binaries (pg_ctl/initdb) found: install the 'postgresql' package "
               "(scripts/setup.sh does with MLOC_WITH_POSTGRES=1) or set MLOC_PG_BINDIR")


def find_pg_bindir() -> Path | None:
    """Directory holding the PostgreSQL server binaries (pg_ctl, initdb, postgres), or None."""
    candidates: list[str] = []
    if os.environ.get("MLOC_PG_BINDIR"):
        candidates.append(os.environ["MLOC_PG_BINDIR"])
    try:
        out = subprocess.run(["pg_config", "--bindir"], check=False, capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    # Debian/Ubuntu keep server binaries off PATH, one directory per major version: newest first.
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    debian.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates.extend(debian)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "pg_ctl").is_file() and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    return None


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    datadir: Path
    logfile: Path

    def url(self, dbname: str, driver: str = "psycopg2") -> str:
        """SQLAlchemy URL; ``driver=""`` gives a plain libpq URL (e.g. for dagster-postgres)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{dbname}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs the real PostgreSQL server of tests/conftest_pg.py")


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("MLOC_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (MLOC_REQUIRE_POSTGRES=1)", pytrace=False)
    pytest.skip(reason)


def _owner_ids() -> tuple[int, int] | None:
    """uid/gid the server runs as when we are root (the wrapper switches to it), else None."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("MLOC_PG_USER", "postgres")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        _skip_or_fail(
            f"running as root and there is no '{name}' account to run PostgreSQL as "
            "(apt-get install postgresql creates it; or set MLOC_PG_USER)"
        )
        raise  # unreachable: skip/fail raise
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def postgres_server() -> Iterator[PgServer]:
    """Start a throw-away PostgreSQL cluster; yield it; stop and remove it. Raises ``RuntimeError``
    when there are no server binaries or it cannot start (the fixture turns that into a skip or a
    failure; the benches that need Postgres call this directly)."""
    from port_for import get_port
    from pytest_postgresql.executors import PostgreSQLExecutor

    bindir = find_pg_bindir()
    if bindir is None:
        raise RuntimeError(NO_BINARIES)
    owner = _owner_ids()
    executable = str(PG_CTL_WRAPPER) if owner is not None else str(bindir / "pg_ctl")

    # A short path (the unix socket path must stay under ~107 bytes). As root, explicitly under
    # /tmp: a root-only $TMPDIR would be out of reach for the account the server runs as.
    base = Path(tempfile.mkdtemp(prefix="mloc-pg-", dir="/tmp" if owner is not None else None))
    if owner is not None:
        os.chown(base, *owner)
    datadir, logfile = base / "data", base / "postgresql.log"

    with pytest.MonkeyPatch.context() as mp:
        # The wrapper must run exactly the binaries we found, not re-discover others.
        mp.setenv("MLOC_PG_BINDIR", str(bindir))
        executor = None
        last_error: Exception | None = None
        # A random free port can be taken by a concurrent session between probe and bind: retry.
        for _ in range(3):
            port = get_port(None)
            assert port is not None
            executor = PostgreSQLExecutor(
                executable=executable,
                host="127.0.0.1",
                port=port,
                datadir=str(datadir),
                unixsocketdir=str(base),
                logfile=str(logfile),
                startparams="-w",
                dbname="tests",
                user="postgres",
                postgres_options=_FAST_POSTGRES_OPTIONS,
            )
            try:
                executor.start()
                break
            except Exception as exc:  # noqa: BLE001 - reported below with the server log
                last_error = exc
                with contextlib.suppress(Exception):
                    executor.stop()
                executor = None
        if executor is None:
            log = logfile.read_text(errors="replace")[-4000:] if logfile.exists() else "(no log)"
            shutil.rmtree(base, ignore_errors=True)
            raise RuntimeError(f"could not start PostgreSQL from {bindir}: {last_error}\n{log}")
        try:
            yield PgServer(host="127.0.0.1", port=port, user="postgres", datadir=datadir, logfile=logfile)
        finally:
            try:
                executor.stop()
            finally:
                shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if find_pg_bindir() is None:
        _skip_or_fail(NO_BINARIES)
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(postgres_server())
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield server


@contextlib.contextmanager
def fresh_database(server: PgServer) -> Iterator[str]:
    """Create an empty database on ``server``; yield its name; drop it afterwards.

    For tests needing more than one database (e.g. Dagster storage and mloc state side by side).
    """
    from pytest_postgresql.janitor import DatabaseJanitor

    dbname = f"mloc_{uuid.uuid4().hex[:12]}"
    janitor = DatabaseJanitor(user=server.user, host=server.host, port=server.port, dbname=dbname, password=None)
    # The janitor terminates leftover connections before DROP DATABASE, so a test that forgot to
    # dispose its engine cannot wedge the teardown.
    with janitor:
        yield dbname


@pytest.fixture
def postgres_url(pg_server: PgServer) -> Iterator[str]:
    with fresh_database(pg_server) as dbname:
        yield pg_server.url(dbname)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_url")


def wait_for_a_lock_wait(store, timeout_s: float = 60.0) -> None:
    """Until a session of the store's PostgreSQL database waits on a lock (a test holding a row
    lock on another connection sees its rival block)."""
    import time

    import sqlalchemy as sa

    query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")
    deadline = time.monotonic() + timeout_s
    while True:
        with store.engine.connect() as conn:  # a new transaction each time: the view is a snapshot
            if conn.execute(query).scalar():
                return
        assert time.monotonic() < deadline, "nobody ever waited for the lock"
        time.sleep(0.05)
