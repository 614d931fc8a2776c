"""The PostgreSQL store (pond/store_pg.py): one contract with SQLite's, its schema and locks, and its
connection string kept secret.

The contract test runs one body against both stores; the rest need the session's private
PostgreSQL server (conftest.postgres).
"""

import os
import sys
import threading
import time

import pytest

from conftest import Pool, run, wait_for
from pond.store import SCHEMA_VERSION, Store

JOB = {"state": "queued", "name": None, "command": ["true"], "env": {}, "capabilities": [], "credential": None,
       "timeout": None, "cancel_grace": 1, "log_cap": 65536, "retries": 0, "created_at": 100.0}


def job(job_id, tags=(), timeout=None, box_timeout=None):
    box = {"profile": "none", **({"limits": {"timeout": box_timeout}} if box_timeout else {})}
    return dict(JOB, id=job_id, tags=sorted(tags), timeout=timeout, sandbox=box)


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path):
    if request.param == "sqlite":
        store = Store(tmp_path / "pond.db")
    else:
        from pond.store_pg import PgStore
        cluster = request.getfixturevalue("postgres")
        os.environ["PGPASSWORD"] = cluster.password
        try:
            store = PgStore(cluster.database())
        finally:
            del os.environ["PGPASSWORD"]
    yield store
    store.close()


def test_both_stores_keep_the_same_contract(any_store):
    """What the PostgreSQL store writes in its own SQL (groups, timeouts, leases), checked on both."""
    s = any_store
    s.add_binding("b1", "orch", "hash", {"tags": []}, 1.0)
    s.add_worker("w1", "b1", "w", ["gpu"], ["sandbox.process"], 2, 1.0)
    assert s.update_worker("w1", "b1", ["gpu"], ["sandbox.process"], 2, True, 2.0)
    assert [b["workers_online"] for b in s.bindings()] == [1]
    assert s.add_job(job("j1", ["gpu"], timeout=50, box_timeout=5), "k-gpu") is None
    assert s.add_job(job("j2", ["tenant:x"]), "k-x", idempotency_key="key") is None
    assert s.add_job(job("j3", ["gpu"], timeout=7), "k-gpu") is None
    assert s.add_job(job("j9"), "k-x", idempotency_key="key")["id"] == "j2"       # the job stored under the key
    assert s.queue_depths(5) == (2, [("k-gpu", 2), ("k-x", 1)])      # /metrics: groups, the largest first
    assert s.queue_depths(1) == (2, [("k-gpu", 2)])
    top, groups = s.queue_groups(0, {"gpu", "cpu"})
    assert [(g["req_key"], g["tags"], g["sealed"]) for g in groups] == [("k-gpu", ["gpu"], 0)]   # tenant:x left out
    assert s.queue_groups(top, {"gpu"}) == (top, [])
    with s.transaction():
        s.claim_lock("b1")
        assert [j["id"] for j in s.queued_jobs("k-gpu", 5)] == ["j1", "j3"]
        assert s.assign_job("j1", "w1", "b1", "claim", 10.0, 20.0)
        assert s.assign_job("j3", "w1", "b1", "claim3", 10.0, 20.0)
        assert not s.assign_job("j1", "w1", "b1", "again", 10.0, 20.0)
    assert [g["req_key"] for g in s.queue_groups(0, {"gpu", "tenant:x"})[1]] == ["k-x"]    # k-gpu emptied
    assert s.active_counts("b1") == {"w1": 2}
    # The effective timeout is the sooner of the job's and its sandbox's: 5 s for j1, 7 s for j3.
    assert [j["id"] for j in s.overdue_jobs(10.0 + 5 + 1 + 1.5, 1.0)] == ["j1"]
    assert sorted(j["id"] for j in s.overdue_jobs(10.0 + 7 + 1 + 1.5, 1.0)) == ["j1", "j3"]
    s.extend_all_leases(15.0)
    assert s.job("j1")["lease_until"] == 20.0
    s.extend_all_leases(30.0)
    assert [j["id"] for j in s.expired_leases(25.0)] == [] and s.job("j3")["lease_until"] == 30.0
    assert s.requeue_job("j1", "assigned", 1, ["w1"]) and s.job("j1")["tried"] == ["w1"]
    assert [g["req_key"] for g in s.queue_groups(0, {"gpu"})[1]] == ["k-gpu"]             # back, as a new group
    # A withdrawal (dispatch._withdraw): j3 has waited assigned since 10.0; asked back once, sent once.
    assert [j["id"] for j in s.withdrawable(11.0, 5)] == ["j3"] and s.withdrawable(10.0, 5) == []
    assert s.ask_withdraw("j3", 1) and not s.ask_withdraw("j3", 1) and s.withdrawable(11.0, 5) == []
    cancels, withdrawals = s.to_send("b1")
    assert cancels == [] and [(w["id"], w["attempt"]) for w in withdrawals] == [("j3", 1)]
    assert s.to_send("b1") == ([], [])
    s.add_chunks("j3", 1, [("stdout", 1, b"b"), ("stdout", 0, b"a\x00"), ("stdout", 0, b"dup")])
    assert s.output("j3", 1) == {"stdout": b"a\x00b", "stderr": b""}
    assert s.put_credential("c", None, ["E"], [], b"\x01\x02", "k1", 1.0)
    assert not s.put_credential("c", "p", ["E"], [], b"\x03", "k1", 2.0)
    assert s.credential("c")["ciphertext"] == b"\x03" and s.credential("c")["env_names"] == ["E"]
    assert s.reaper_turn() and s.reaper_turn()          # asked again, still the one


def test_one_replica_at_a_time_holds_the_reaper_lock(postgres, monkeypatch):
    from pond.store_pg import PgStore
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    url = postgres.database()
    a, b = PgStore(url), PgStore(url)
    try:
        assert a.reaper_turn() and not b.reaper_turn() and a.reaper_turn()
        a.close()                   # its session ends: the lock is free once the server has seen it go
        wait_for(b.reaper_turn, 5, what="the lock to pass to b")
    finally:
        b.close()


def test_a_replica_s_requests_run_side_by_side_on_its_pool_of_connections(postgres, monkeypatch):
    """One thread inside a transaction (a claim holding its rows, a slow commit) holds up only its own
    connection: another thread's statements go on on another one of the pool. With a pool of one,
    they wait for it, as every request did when a replica had one connection."""
    from pond.store_pg import PgStore
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    url = postgres.database()
    for size, waits in ((2, False), (1, True)):
        store, inside, leave, done = PgStore(url, pool=size), threading.Event(), threading.Event(), threading.Event()

        def hold():
            with store.transaction():
                store.add_job(job(f"j{size}"), "k")
                inside.set()
                leave.wait(10)

        holder = threading.Thread(target=hold)
        reader = threading.Thread(target=lambda: (store.job_counts(), done.set()))
        try:
            holder.start()
            assert inside.wait(10)
            reader.start()
            assert done.wait(2) is not waits, f"pool of {size}"
            if not waits:
                assert store.job(f"j{size}") is None        # the open transaction is not seen outside it
        finally:
            leave.set()
            holder.join(10)
            reader.join(10)
            store.close()
        assert done.is_set()


def test_a_database_pool_out_of_range_is_refused_at_start(tmp_path):
    from conftest import env_for_children
    for flags, env in ((("--database-pool", "0"), {}), ((), {"POND_DATABASE_POOL": "65"})):
        done = serve(tmp_path, *flags, env=dict(env_for_children(), **env))
        assert done.returncode == 2 and "database pool" in done.stderr and "1 to 64" in done.stderr, done.stderr


def test_replicas_starting_at_once_create_the_schema_once(postgres, monkeypatch):
    """Without the migration lock, concurrent CREATE TABLE IF NOT EXISTS fail on PostgreSQL's catalog."""
    from pond.store_pg import PgStore
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    url, stores, errors = postgres.database(), [], []
    start = threading.Barrier(6)

    def open_one():
        start.wait(10)
        try:
            stores.append(PgStore(url))
        except Exception as e:          # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors and len(stores) == 6, errors
        with postgres.connect(url.rsplit("/", 1)[1]) as conn:
            assert conn.execute("SELECT version FROM pond_schema").fetchall() == [(SCHEMA_VERSION,)]
            conn.execute("UPDATE pond_schema SET version = version + 1")
        with pytest.raises(RuntimeError, match=f"schema {SCHEMA_VERSION + 1}; this pond knows up to"):
            PgStore(url)
    finally:
        for s in stores:
            s.close()


def serve(tmp_path, *flags, env=None):
    return run([sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"),
                *flags], env=env, timeout=30)


def test_the_database_password_never_shows_in_ps_logs_or_errors(postgres, tmp_path):
    from conftest import env_for_children
    secret_url = postgres.url("x").replace("pond@", f"pond:{postgres.password}@")
    # In a flag it would show in `ps`: refused, without echoing it.
    done = serve(tmp_path, "--database", secret_url)
    assert done.returncode != 0 and "--database holds a password" in done.stderr
    assert postgres.password not in done.stdout + done.stderr
    done = serve(tmp_path, "--database", "mysql://pond@127.0.0.1/x")
    assert done.returncode != 0 and "must be a postgresql:// URL" in done.stderr
    # A server that refuses the password: the error names the server, never the password.
    wrong = postgres.url("postgres").replace("pond@", "pond:not-the-password@")
    done = serve(tmp_path, env=dict(env_for_children(), POND_DATABASE_URL=wrong))
    assert done.returncode != 0 and "password authentication failed" in done.stderr, done.stderr
    assert "not-the-password" not in done.stdout + done.stderr and "pond:***@127.0.0.1" in done.stderr
    # From POND_DATABASE_URL, password and all: pond runs, and says where without it.
    database = postgres.database().replace("pond@", f"pond:{postgres.password}@")
    pool = Pool(tmp_path)
    try:
        proc = pool.start([sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir",
                           str(tmp_path / "p")], "pond", env=dict(env_for_children(), POND_DATABASE_URL=database))
        line = proc.ready()
        assert "database postgresql://pond:***@127.0.0.1" in line and postgres.password not in line
        cmdline = open(f"/proc/{proc.proc.pid}/cmdline", "rb").read()
        assert postgres.password.encode() not in cmdline
        proc.stop()
        assert postgres.password not in proc.log_path.read_text()
    finally:
        pool.stop_all()


def test_a_replica_reconnects_after_its_connections_are_cut(tmp_path, postgres):
    """A restarted server or a killed backend: the next request runs on a new connection, and
    the listener comes back, so held polls still wake at a submit to the other replica."""
    from test_replicas import bare
    pool = Pool(tmp_path, postgres)
    try:
        a = pool.pond(extra=("--allow-unsigned-results",))
        b = pool.replica(a, extra=("--allow-unsigned-results",))
        database = pool.databases[a.state_dir].rsplit("/", 1)[1]
        token = bare(b)
        with postgres.connect() as conn:
            cut = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                               (database,)).fetchall()
        assert len(cut) >= 4                        # both replicas' main and listener connections
        assert a.api("GET", "/v1/jobs")[0] == 200 and b.api("GET", "/v1/orch/whoami", token=token)[0] == 200

        def listening():
            with postgres.connect() as conn:
                return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query = %s",
                                    (database, "LISTEN pond")).fetchone()[0] == 2
        wait_for(listening, 10, what="both listeners back")
        answer = {}
        poll = threading.Thread(target=lambda: answer.update(r=b.api("POST", "/v1/orch/poll", {"wait": 10},
                                                                       token=token)))
        poll.start()
        time.sleep(0.5)
        assert not answer           # held: no job yet
        job = a.submit(["true"])
        poll.join(15)
        status, body = answer["r"]
        assert status == 200 and [j["job_id"] for j in body["jobs"]] == [job["id"]], body
        assert a.api("GET", "/healthz")[0] == 200 and b.api("GET", "/healthz")[0] == 200
    finally:
        pool.stop_all()


def test_migrate_store_moves_an_install_from_sqlite_to_postgresql(tmp_path, postgres):
    """A pond on SQLite runs a job and stops; `pond migrate-store` copies it; the same state dir on
    PostgreSQL has the job, its signed output, the pool, and takes new work from the same orchestrator."""
    from conftest import JOB_PY, env_for_children
    sqlite_pool, pg_pool = Pool(tmp_path / "a"), Pool(tmp_path / "b", postgres)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    try:
        pond = sqlite_pool.pond()
        orch = sqlite_pool.orchestrator(pond)
        sqlite_pool.worker(pond, orch)
        first = pond.wait_job(pond.submit([JOB_PY, "-c", "print('before')"])["id"])
        assert first["state"] == "done"
        src = tmp_path / "src"                     # a bundle and an artifact: blobs in pond's state dir
        src.mkdir()
        (src / "in.txt").write_text("moved along\n")
        sourced = pond.cli("submit", "--profile", "none", "--source", str(src), "--artifact", "out.txt", "--wait",
                           "--", "/bin/sh", "-c", "cat in.txt > out.txt")
        assert sourced.returncode == 0, sourced.stderr
        sourced_id = sourced.stderr.split("submitted ")[1].split()[0]
        url = postgres.database()
        migrate = [sys.executable, "-m", "pond", "migrate-store", "--from", f"sqlite:{pond.state_dir}", "--to", url]
        running = run(migrate, env=postgres.env(env_for_children()))
        assert running.returncode == 2 and "still runs on" in running.stderr, running.stderr
        sqlite_pool.stop_all()
        done = run(migrate, env=postgres.env(env_for_children()))
        assert done.returncode == 0 and "2 jobs" in done.stdout and "1 workers" in done.stdout, done.stderr
        assert "3 blobs" in done.stdout, done.stdout        # the bundle and both artifacts
        again = run(migrate, env=postgres.env(env_for_children()))
        assert again.returncode == 2 and "already holds pond data" in again.stderr, again.stderr

        moved = pg_pool.pond(state=pond.state_dir, database=url, port=int(pond.url.rsplit(":", 1)[1]))
        job = moved.job(first["id"])
        assert (job["state"], job["attested"]) == ("done", True) and moved.output(first["id"])["stdout"] == b"before\n"
        assert moved.cli("verify", first["id"]).returncode == 0
        got = moved.cli("artifacts", sourced_id, "--get", "work/out.txt")
        assert got.returncode == 0 and got.stdout == "moved along\n", got.stderr
        assert moved.cli("verify", sourced_id).returncode == 0
        orch = pg_pool.orchestrator(moved, state=orch.state_dir)       # paired before the move
        pg_pool.worker(moved, orch, state=sqlite_pool.procs[-1].state_dir)
        second = moved.wait_job(moved.submit([JOB_PY, "-c", "print('after')"])["id"], timeout=30)
        assert second["state"] == "done" and moved.output(second["id"])["stdout"] == b"after\n"
    finally:
        sqlite_pool.stop_all()
        pg_pool.stop_all()
