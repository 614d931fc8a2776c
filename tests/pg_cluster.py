"""A private PostgreSQL server for the tests: Debian's binaries, a cluster in a temp dir, a local port.

Never the system's service: initdb and pg_ctl from /usr/lib/postgresql/*/bin run a cluster of
our own, as an unprivileged user (PostgreSQL refuses root: as root, its `postgres` user), with
password authentication, no fsync (a test database need not survive a power cut) and its
socket in that temp dir. pg_ctl starts the server detached, so it is no child of pytest's
(the no_leaks fixture would count it); stop() runs `pg_ctl stop` and waits until the
postmaster's pid is gone. Each pond a test starts gets a database of its own (database()): a new
one, or one that an earlier test gave back (recycle()) emptied, which is ~10 x cheaper than
CREATE DATABASE (a file copy and two checkpoints: 0.15-0.7 s and ~12 MB each on the CI machine).

    python tests/pg_cluster.py    # start one by hand, print its URL, stop it on Enter
"""

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "pond"           # the database role the tests connect as
START_TIMEOUT = 30


def binaries():
    """The newest /usr/lib/postgresql/N/bin with initdb and pg_ctl, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One running server. url(db) has no password; env() carries it in PGPASSWORD."""

    def __init__(self, durable=False):
        """`durable`: fsync and synchronous commits on, as in production (bench/store.py); the
        tests run without them."""
        self.bin = binaries()
        self.durable = durable
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql (or run .ci/run)")
        self.run_as = "postgres" if os.getuid() == 0 else None
        self.dir = Path(tempfile.mkdtemp(prefix="pond-pg-"))
        self.password = secrets.token_urlsafe(18)
        self.port = _free_port()
        self.count = 0
        self.free = []          # databases given back by recycle(), empty, for the next database()
        self.pid = None
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _run(self, *argv, timeout=START_TIMEOUT):
        done = subprocess.run([str(self.bin / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout,
                              user=self.run_as, cwd=self.dir, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done

    def _start(self):
        pwfile = self.dir / "pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, self.password.encode() + b"\n")
        os.close(fd)
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", "data", "-U", USER, "--pwfile", "pw", "-A", "scram-sha-256", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        pwfile.unlink()
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", "data", "-o", options, "-l", "log", "-w", "-t", str(START_TIMEOUT), "start")
        self.pid = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])

    def url(self, database="postgres"):
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def env(self, base=None):
        return dict(base if base is not None else os.environ, PGPASSWORD=self.password)

    def connect(self, database="postgres"):
        import psycopg
        return psycopg.connect(self.url(database), password=self.password, autocommit=True)

    def database(self, prefix="t"):
        """An empty database of its own -> its URL (no password in it)."""
        if self.free and prefix == "t":
            return self.url(self.free.pop())
        self.count += 1
        name = f"{prefix}{self.count}_{secrets.token_hex(3)}"
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return self.url(name)

    def recycle(self, url):
        """Take back a database whose ponds have stopped: its sessions are ended (a pond killed with
        -9 may leave one, holding an advisory lock) and everything in it is dropped, so that the next
        database() hands it out as empty as a new one."""
        name = url.rsplit("/", 1)[1]
        with self.connect() as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        with self.connect(name) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
        self.free.append(name)

    def dump(self, database):
        """pg_dump of a database: all it stores, as bytes."""
        return subprocess.run([str(self.bin / "pg_dump"), "--data-only", "-d", self.url(database)], check=True,
                              capture_output=True, env=self.env(), timeout=60).stdout

    def log(self):
        try:
            return (self.dir / "log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self):
        """Stop the server and remove its files; nothing of it keeps running."""
        if self.pid is not None:
            try:
                self._run("pg_ctl", "-D", "data", "-m", "fast", "-w", "-t", "20", "stop", timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired):
                try:
                    os.kill(self.pid, 9)        # the postmaster; its children exit when it is gone
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


if __name__ == "__main__":
    cluster = Cluster()
    try:
        print(cluster.url(), "PGPASSWORD=" + cluster.password, flush=True)
        input("Enter stops it. ")
    finally:
        cluster.stop()
