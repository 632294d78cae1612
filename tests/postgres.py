"""A throwaway PostgreSQL 15 server for the tests: initdb and pg_ctl in a temporary folder, listening
on a loopback port only (no Unix socket), trust authentication, stopped at the end of the session.

PostgreSQL refuses to run as root, so as root the server runs as the system user `postgres`.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_BIN = Path(os.environ.get("RETRIEVAL_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server: start() it, make a fresh database per test with database(), stop() it."""

    def __init__(self):
        self.user = "postgres" if os.geteuid() == 0 else None  # whom the server runs as
        self.folder = Path(tempfile.mkdtemp(prefix="retrieval-pg-"))  # not under pytest's 0700 root folder
        self.data, self.log = self.folder / "data", self.folder / "server.log"
        self.port = _free_port()
        if self.user:
            ids = pwd.getpwnam(self.user)
            os.chown(self.folder, ids.pw_uid, ids.pw_gid)

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(PG_BIN / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self) -> "Server":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions")
        # fsync off: a test server's data is thrown away anyway
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off"
        self._run("pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data), "-l", str(self.log), "-o", options)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", "fast")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
