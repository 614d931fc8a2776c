"""Where bundles and artifacts live (pond/blobs.py), how long they stay, and a redeem whose answer is lost.

- On PostgreSQL every replica reads the blobs any one wrote: a bundle uploaded through one replica
  is redeemed through another; artifacts uploaded through that one come back through the first.
- The reaper deletes bundles no live job needs and artifacts of ended jobs past their retention
  (set to seconds here); a worker keeps at most --repo-mirrors git mirrors.
- A redeem answer cut on its way back (a real TCP proxy that closes the connection) is asked for
  again, and pond seals the key afresh for the same worker.
"""

import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

from conftest import JOB_PY, SWARM, run, wait_for
from test_bundles import EDIT, GIT_ENV, _packed, git, git_server, make_repo  # noqa: F401 (a fixture)

import swarm
from pond import bundles


def _job_id(done):
    return done.stderr.split("submitted ")[1].split()[0]


def _blob_exists(pond, key):
    if pond.database is None:
        return (pond.state_dir / "blobs" / key).exists()
    return pond.sql("SELECT COUNT(*) FROM blobs WHERE key = ?", (key,))[1][0][0] > 0


# -- one blob store for every replica ------------------------------------------------------------

def test_a_bundle_uploaded_through_one_replica_is_redeemed_through_another_and_artifacts_come_back(pg_pool, tmp_path):
    a = pg_pool.pond()
    b = pg_pool.replica(a)
    orch = pg_pool.orchestrator(b)              # the pool reaches pond through b only
    pg_pool.worker(b, orch)
    repo = make_repo(tmp_path / "repo")
    done = a.cli("submit", "--profile", "none", "--source", str(repo), "--artifact", "out/*.txt", "--wait",
                 "--", JOB_PY, "-c", EDIT)      # packed and uploaded through a
    assert done.returncode == 0, done.stderr
    assert "'a.txt', 'gone.txt', 'main-link', 'src', 'src/main.py', 'src/run.sh'" in done.stdout, done.stdout
    job_id = _job_id(done)
    events = [e["event"] for e in a.job(job_id)["events"]]
    assert "source_sealed" in events, events
    assert not (a.state_dir / "blobs").exists() and not (b.state_dir / "blobs").exists()
    got = a.cli("artifacts", job_id, "--get", "work/out/report.txt")       # uploaded through b
    assert got.returncode == 0 and got.stdout == "all good\n", got.stderr
    applied = a.cli("artifacts", job_id, "--apply", "--dir", str(repo))
    assert applied.returncode == 0, applied.stderr
    assert (repo / "a.txt").read_text() == "alpha, edited\n" and not (repo / "gone.txt").exists()
    verified = a.cli("verify", job_id)         # reads the artifacts from the database
    assert verified.returncode == 0, verified.stderr
    # The digest is checked against what the worker signed: a row altered in the database is refused.
    key = f"artifacts/{job_id}/1/work/out/report.txt"
    assert a.sql("UPDATE blobs SET data = ? WHERE key = ?", (b"all bad\n", key))[0] == 1
    got = a.cli("artifacts", job_id, "--get", "work/out/report.txt")
    assert got.returncode != 0 and "does not match the sha256 its worker signed" in got.stderr, got.stderr
    tampered = a.cli("verify", job_id)
    assert tampered.returncode != 0 and "work/out/report.txt" in tampered.stderr, tampered.stderr


def test_a_blob_in_postgresql_is_written_and_read_in_rows_never_whole(postgres, monkeypatch):
    """A 1 MiB piece spans rows of store_pg.BLOB_ROW: reads at any offset give the same bytes."""
    from pond.store_pg import BLOB_ROW, PgStore
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    store = PgStore(postgres.database())
    try:
        data = os.urandom(BLOB_ROW * 3 + 1000)
        assert store.blob_append("bundles/b_x", 0, data[:BLOB_ROW + 7]) == BLOB_ROW + 7
        assert store.blob_append("bundles/b_x", BLOB_ROW + 7, data[BLOB_ROW + 7:]) == len(data)
        try:
            store.blob_append("bundles/b_x", 5, b"late")
            raise AssertionError("an append not at the end was taken")
        except ValueError:
            pass
        assert store.blob_size("bundles/b_x") == len(data)
        for offset, n in ((0, len(data)), (3, 10), (BLOB_ROW - 2, 4), (BLOB_ROW + 7, BLOB_ROW * 2), (len(data), 9)):
            assert store.blob_read("bundles/b_x", offset, n) == data[offset:offset + n], (offset, n)
        rows = store._all("SELECT len FROM blobs WHERE key = 'bundles/b_x' ORDER BY off")
        assert max(r["len"] for r in rows) <= BLOB_ROW and sum(r["len"] for r in rows) == len(data)
        store.blob_delete("bundles/b_x")
        assert store.blob_size("bundles/b_x") == 0 and store.blob_read("bundles/b_x", 0, 10) == b""
    finally:
        store.close()


# -- garbage collection ------------------------------------------------------------------------------

def test_the_reaper_deletes_bundles_no_live_job_needs_and_artifacts_past_their_retention(pool, tmp_path):
    pond = pool.pond(extra=("--bundle-retention", "2", "--artifact-retention", "3"))
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    repo = make_repo(tmp_path / "repo")
    unused = bundles.upload(pond.client, *_packed(repo, tmp_path))
    waiting = bundles.upload(pond.client, *_packed(repo, tmp_path))
    queued = pond.submit(["true"], tags=["pool:nobody"], source={"bundle": waiting})     # no worker has the tag
    done = pond.cli("submit", "--profile", "none", "--source", str(repo), "--artifact", "out/*.txt", "--wait",
                    "--", JOB_PY, "-c", EDIT)
    assert done.returncode == 0, done.stderr
    ran = pond.job(_job_id(done))
    artifact = f"artifacts/{ran['id']}/1/work/out/report.txt"
    assert _blob_exists(pond, artifact)
    wait_for(lambda: not _blob_exists(pond, f"bundles/{unused}"), 15, interval=0.2, what="the unused bundle to go")
    assert pond.api("GET", f"/v1/bundles/{unused}")[0] == 404
    wait_for(lambda: not _blob_exists(pond, f"bundles/{ran['source']['bundle']}"), 15, interval=0.2,
             what="the ended job's bundle to go")
    wait_for(lambda: not _blob_exists(pond, artifact), 15, interval=0.2, what="the ended job's artifacts to go")
    status, body = pond.api("GET", f"/v1/jobs/{ran['id']}/artifacts/work/out/report.txt")
    assert status == 410 and body["error"]["code"] == "expired", body
    got = pond.cli("artifacts", ran["id"], "--get", "work/out/report.txt")
    assert got.returncode != 0 and "--artifact-retention" in got.stderr, got.stderr
    verified = pond.cli("verify", ran["id"])        # the signed result still verifies; their digests stay in it
    assert verified.returncode == 0, verified.stderr
    # The queued job's bundle outlived its retention twice over: a job that has not ended needs it.
    assert _blob_exists(pond, f"bundles/{waiting}") and pond.api("GET", f"/v1/bundles/{waiting}")[0] == 200
    pond.client.post(f"/v1/jobs/{queued['id']}/cancel", {})
    wait_for(lambda: not _blob_exists(pond, f"bundles/{waiting}"), 15, interval=0.2,
             what="the cancelled job's bundle to go")
    metrics = pond.api("GET", "/metrics")[1]
    assert 'pond_blobs_collected_total{kind="bundle"} 3' in metrics, metrics
    assert 'pond_blobs_collected_total{kind="artifact"} 2' in metrics, metrics      # report.txt, changes.patch
    assert "collected 1 bundles" in pond.proc.stderr() or "collected 2 bundles" in pond.proc.stderr()


def test_on_postgresql_one_replica_collects_for_all(pg_pool, tmp_path):
    retention = ("--bundle-retention", "1", "--artifact-retention", "1")
    a = pg_pool.pond(extra=retention)
    b = pg_pool.replica(a, extra=retention)
    repo = make_repo(tmp_path / "repo")
    ids = [bundles.upload(p.client, *_packed(repo, tmp_path)) for p in (a, b, a)]
    wait_for(lambda: all(a.api("GET", f"/v1/bundles/{i}")[0] == 404 for i in ids), 15, interval=0.2,
             what="the bundles to be collected")
    assert a.sql("SELECT COUNT(*) FROM blobs")[1][0][0] == 0
    said = [p for p in (a, b) if "collected" in p.proc.stderr()]
    assert len(said) == 1, [p.proc.stderr()[-500:] for p in (a, b)]    # the replica holding the reaper's lock
    metrics = said[0].api("GET", "/metrics")[1]
    assert 'pond_blobs_collected_total{kind="bundle"} 3' in metrics, metrics


def test_a_retention_out_of_range_is_refused_at_start(tmp_path):
    done = run([sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path),
                "--artifact-retention", "0"])
    assert done.returncode != 0 and "artifact retention 0 s is out of range" in done.stderr, done.stderr


def _mirror(mirrors, name, used_at):
    subprocess.run(["git", "init", "-q", "--bare", str(mirrors / name)], check=True, env=GIT_ENV)
    lock = mirrors / (name + ".lock")
    lock.touch()
    os.utime(lock, (used_at, used_at))


def test_a_worker_keeps_its_most_recently_used_mirrors_and_never_removes_one_in_use(tmp_path):
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    for name, used_at in (("old.git", 1000), ("mid.git", 2000), ("new.git", 3000)):
        _mirror(mirrors, name, used_at)
    with open(mirrors / "old.git.lock", "a") as held:       # a job is fetching into the oldest
        fcntl.flock(held, fcntl.LOCK_EX)
        swarm.prune_mirrors(mirrors, 1)
        assert sorted(p.name for p in mirrors.glob("*.git")) == ["new.git", "old.git"]
    swarm.prune_mirrors(mirrors, 1)                         # its job is done with it
    assert sorted(p.name for p in mirrors.glob("*.git")) == ["new.git"]


def test_a_worker_with_repo_mirrors_1_keeps_the_mirror_of_its_last_repository(pool, tmp_path, git_server):
    url, _ = git_server
    served = tmp_path / "served"
    subprocess.run(["git", "clone", "-q", "--bare", str(served / "repo.git"), str(served / "other.git")], check=True,
                   env=GIT_ENV)
    git(served / "other.git", "update-server-info")
    other = url.replace("/repo.git", "/other.git")
    port = url.split(":")[2].split("/")[0]
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch, extra=("--egress-allow", "127.0.0.1", "--egress-allow-loopback", "127.0.0.1",
                                            "--egress-ports", port, "--repo-mirrors", "1"))
    mirrors = worker.state_dir / "checkouts" / "mirrors"
    for repo in (url, other):
        done = pond.wait_job(pond.submit(["true"], source={"git": repo, "ref": "master"})["id"], timeout=60)
        assert done["state"] == "done", done
        assert [p.name for p in mirrors.glob("*.git")] == [hashlib.sha256(repo.encode()).hexdigest()[:32] + ".git"]
    assert "removed git mirror" in worker.stderr()


def test_repo_mirrors_must_be_at_least_one(tmp_path):
    done = run([sys.executable, SWARM, "worker", "--orchestrator", "http://127.0.0.1:9", "--state-dir",
                str(tmp_path / "w"), "--repo-mirrors", "0"])
    assert done.returncode != 0 and "--repo-mirrors must be from 1" in done.stderr, done.stderr


# -- a redeem whose answer is lost ---------------------------------------------------------------------

class CutFirstAnswer:
    """A TCP proxy to 127.0.0.1:`port` that closes the connection, instead of passing the answer on,
    of the first request whose bytes hold `marker`: pond did the work, its caller never hears of it."""

    def __init__(self, port, marker):
        self.port, self.marker, self.armed, self.cut = port, marker, True, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop, self.lock, self.socks, self.threads = threading.Event(), threading.Lock(), [], []
        self._start(self._accept)

    def _start(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.socks += [client, upstream]
            flag = {"cut": False}
            self._start(self._pipe, client, upstream, flag, True)
            self._start(self._pipe, upstream, client, flag, False)

    def _pipe(self, src, dst, flag, request):
        try:
            while data := src.recv(65536):
                if request:
                    with self.lock:
                        if self.armed and self.marker in data:
                            self.armed, flag["cut"] = False, True
                elif flag["cut"]:
                    self.cut += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.listener.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(5)


def test_a_redeem_whose_answer_is_lost_is_asked_again_and_sealed_afresh(pool, tmp_path):
    pond = pool.pond()
    port = int(pond.url.rsplit(":", 1)[1])
    proxy = CutFirstAnswer(port, b"/source HTTP/1.1")
    try:
        orch = pool.orchestrator(pond, extra=("--pond", proxy.url))
        pool.worker(pond, orch)
        repo = make_repo(tmp_path / "repo")
        job = pond.submit([JOB_PY, "-c", "import os; print(sorted(os.listdir('.')))"],
                          source={"bundle": bundles.upload(pond.client, *_packed(repo, tmp_path))})
        done = pond.wait_job(job["id"], timeout=60)
        assert proxy.cut == 1
        assert done["state"] == "done", done
        assert "'a.txt'" in pond.output(job["id"])["stdout"].decode()
        events = [e["event"] for e in done["events"]]
        assert events.count("source_sealed") == 1 and events.count("source_resealed") >= 1, events
    finally:
        proxy.close()


def test_a_schema_4_store_gets_the_redeeming_worker_and_on_postgresql_the_blobs_table(tmp_path, postgres,
                                                                                     monkeypatch):
    from pond.store import Store
    from pond.store_pg import PgStore
    store = Store(tmp_path / "pond.db")
    store._db.execute("ALTER TABLE source_tokens DROP COLUMN redeemed_by")
    store._db.execute("PRAGMA user_version=4")
    store.close()
    store = Store(tmp_path / "pond.db")
    try:
        assert "redeemed_by" in {r["name"] for r in store._all("PRAGMA table_info(source_tokens)")}
    finally:
        store.close()
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    url = postgres.database()
    store = PgStore(url)
    with store.transaction():
        store._db.execute("ALTER TABLE source_tokens DROP COLUMN redeemed_by")
        store._db.execute("DROP TABLE blobs")
        store._db.execute("UPDATE pond_schema SET version = 4")
    store.close()
    store = PgStore(url)
    try:
        store.add_source_token("j_x", 1, "h")
        assert store.redeem_source_token("j_x", 1, 5.0, "f" * 64) and store.source_token("j_x", 1)["redeemed_by"] == "f" * 64
        assert store.blob_append("bundles/b_y", 0, b"abc") == 3 and store.blob_read("bundles/b_y", 1, 5) == b"bc"
    finally:
        store.close()
