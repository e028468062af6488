"""A throwaway PostgreSQL server on loopback for storage tests (skips when none can start)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).is_file():
            return str(d / name)
    return None


@contextmanager
def postgres_server(tmp: Path | None = None) -> Iterator[str]:
    """Yield a postgresql:// URL of a fresh server; pytest.skip with the reason when impossible."""
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's default driver for postgresql://)
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    import tempfile

    run_as: list[str] = []
    # outside pytest's private tmp folders: the server's user must be able to reach it
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
    data = tmp / "pgdata"
    data.mkdir(parents=True)
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres")
        os.chmod(tmp, 0o755)
    port = _free_port()
    log = tmp / "pg.log"
    proc = subprocess.run(run_as + [initdb, "-D", str(data), "-U", "evomerge", "--auth=trust"], capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        pytest.skip(f"initdb failed: {proc.stderr.strip()[:200]}")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    if run_as:
        log.touch()
        shutil.chown(log, "postgres")
    proc = subprocess.run(run_as + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w", "start"], capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {proc.stderr.strip()[:200]}")
    try:
        import psycopg

        for _ in range(50):
            try:
                psycopg.connect(host="127.0.0.1", port=port, user="evomerge", dbname="postgres").close()
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        yield f"postgresql://evomerge@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, cwd="/")
        shutil.rmtree(tmp, ignore_errors=True)
