"""Dispatch with real processes: matching, slots, cancel, output, the job's environment, following logs."""

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time

import pytest
from conftest import JOB_PY, SWARM, Proc, env_for_children, wait_for

PY = sys.executable
ACTIVE = ("assigned", "running")


def blocking_job(release):
    """A command that runs until the file `release` exists."""
    return [JOB_PY, "-c", "import os, sys, time\n"
                      "while not os.path.exists(sys.argv[1]): time.sleep(0.02)", str(release)]


def all_jobs(pond):
    return pond.client.get("/v1/jobs", limit=1000)["jobs"]


def wait_end(pond, job_id, timeout, where):
    """The job once it has ended; on timeout, say where it is stuck."""
    try:
        return pond.wait_job(job_id, timeout=timeout)
    except AssertionError:
        job = pond.job(job_id)
        raise AssertionError(f"job {job_id} did not run {where} within {timeout} s: it is {job['state']}"
                             f" on worker {job['worker']} (attempt {job['attempt']})") from None


def proves_dispatch_ran(pond, worker):
    """Run a job every worker can take and wait for it: pond has since considered the older queued jobs."""
    probe = pond.submit([JOB_PY, "-c", "pass"])
    done = pond.wait_job(probe["id"])
    assert done["state"] == "done" and done["worker"] == worker.worker_id, done


def test_job_needing_a_tag_no_worker_has_waits_then_runs_where_the_tag_is(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    plain = pool.worker(pond, orch, tags="pool:trusted", capabilities="harness.*")
    job = pond.submit([JOB_PY, "-c", "print('ran')"], tags=["repo:acme"])
    proves_dispatch_ran(pond, plain)

    view = pond.job(job["id"])
    assert view["state"] == "queued" and view["worker"] is None
    assert "no worker with tag repo:acme" in view["waiting"]["reason"]
    assert view["waiting"]["online"] == 1 and view["waiting"]["matching"] == 0
    cli = pond.cli("job", job["id"])
    assert cli.returncode == 0, cli.stderr
    assert "waiting:" in cli.stdout and "no worker with tag repo:acme" in cli.stdout
    assert f"(group {view['group']})" in cli.stdout and len(view['group']) == 12     # its name on /metrics

    acme = pool.worker(pond, orch, tags="repo:acme")
    done = pond.wait_job(job["id"])
    assert done["state"] == "done", done
    assert done["worker"] == acme.worker_id
    assert pond.output(job["id"])["stdout"] == b"ran\n"


def pond_metric(pond, name):
    status, text = pond.api("GET", "/metrics", token=None)
    assert status == 200, text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_groups_no_worker_fits_cost_nothing_per_poll_until_the_workers_change(pool):
    """specs/matching.md §4: a poll matches only the requirement groups it has not seen with
    this set of workers, so 300 groups nobody fits are not matched again on every poll."""
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch, capabilities="skill.a")
    # A capability the worker lacks: these groups get past the store's tag filter and are matched.
    waiting = [pond.submit([JOB_PY, "-c", "pass"], capabilities=[f"skill.h{i}"]) for i in range(300)]
    proves_dispatch_ran(pond, worker)            # its group is newer than theirs: all were matched by now
    before = pond_metric(pond, "pond_group_matches_total")
    assert before >= 300
    for _ in range(5):
        proves_dispatch_ran(pond, worker)        # a submit, an assignment and a report each wake the poll
    assert pond_metric(pond, "pond_group_matches_total") - before <= 10     # the probe's group, once each
    assert "no worker with capability skill.h7" in pond.job(waiting[7]["id"])["waiting"]["reason"]

    # A new worker that fits an old group gets its job, and so does a worker that comes back
    # with another capability: a changed worker set is matched against every group again.
    h7 = pool.worker(pond, orch, capabilities="skill.h7")
    done = wait_end(pond, waiting[7]["id"], 15, "on the new worker with skill.h7")
    assert done["state"] == "done" and done["worker"] == h7.worker_id, done
    assert worker.stop() == 0
    back = pool.worker(pond, orch, capabilities="skill.h3", state=worker.state_dir)
    done = wait_end(pond, waiting[3]["id"], 15, "on the worker restarted with skill.h3")
    assert done["state"] == "done" and done["worker"] == back.worker_id == worker.worker_id, done
    assert pond.job(waiting[4]["id"])["state"] == "queued"


# Starts the command in its argv with descriptors 3 to 1,099 taken, so every socket it opens is above 1,024.
HIGH_DESCRIPTORS = ("import os, sys\nfd = os.open('/dev/null', os.O_RDONLY)\nos.set_inheritable(fd, True)\n"
                    "for n in range(fd + 1, 1100):\n    os.dup2(fd, n)\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def test_an_orchestrator_with_descriptors_above_1024_still_hands_out_jobs(pool):
    """With 1,000 workers an orchestrator's connections have descriptors above 1,024, which
    select() cannot take: a held claim must still see its worker alive and hand it its job."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2048:
        pytest.skip("needs a descriptor limit of at least 2048")
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    assert orch.stop() == 0
    high = pool.start([PY, "-c", HIGH_DESCRIPTORS, *orch.argv[1:]], "orch")
    worker = pool.worker(pond, high)
    job = pond.submit([JOB_PY, "-c", "print('ran')"])
    done = wait_end(pond, job["id"], 15, "through the orchestrator with high descriptors")
    assert done["state"] == "done" and done["worker"] == worker.worker_id, done
    assert pond.output(job["id"])["stdout"] == b"ran\n"


def test_capability_globs_match_one_way(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    codex = pool.worker(pond, orch, capabilities="skill.codex")
    claude_job = pond.submit([JOB_PY, "-c", "pass"], capabilities=["skill.claude"])
    codex_job = pond.submit([JOB_PY, "-c", "pass"], capabilities=["skill.codex"])
    done = pond.wait_job(codex_job["id"])
    assert done["state"] == "done" and done["worker"] == codex.worker_id, done

    # skill.codex does not take skill.claude...
    view = pond.job(claude_job["id"])
    assert view["state"] == "queued", view
    assert "no worker with capability skill.claude" in view["waiting"]["reason"]
    cli = pond.cli("job", claude_job["id"])
    assert "no worker with capability skill.claude" in cli.stdout

    # ...and skill.* takes it.
    anyskill = pool.worker(pond, orch, capabilities="skill.*")
    done = pond.wait_job(claude_job["id"])
    assert done["state"] == "done" and done["worker"] == anyskill.worker_id, done


def test_tier_trusted_runs_only_on_a_pool_trusted_worker(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    untrusted = pool.worker(pond, orch, tags="pool:local")
    job = pond.submit([JOB_PY, "-c", "pass"], sandbox={"profile": "none", "tier": "trusted"})
    assert "pool:trusted" in job["tags"]
    proves_dispatch_ran(pond, untrusted)
    view = pond.job(job["id"])
    assert view["state"] == "queued", view
    assert "no worker with tag pool:trusted" in view["waiting"]["reason"]

    trusted = pool.worker(pond, orch, tags="pool:trusted")
    done = pond.wait_job(job["id"])
    assert done["state"] == "done" and done["worker"] == trusted.worker_id, done


def test_worker_never_holds_more_jobs_than_its_concurrency(pool, shared_path):
    pond = pool.pond(extra=("--assign-ahead", "0"))        # none held beyond its slots (test_assign_ahead.py)
    orch = pool.orchestrator(pond)
    w = pool.worker(pond, orch, concurrency=2)
    release = {}
    for i in range(5):
        job = pond.submit(blocking_job(shared_path / f"release-{i}"))
        release[job["id"]] = shared_path / f"release-{i}"
    most = [0]

    def active():
        """Jobs of ours held by the worker now; every observation must be within its slots."""
        jobs = [j for j in all_jobs(pond) if j["id"] in release]
        held = [j for j in jobs if j["state"] in ACTIVE]
        assert all(j["worker"] == w.worker_id for j in held)
        most[0] = max(most[0], len(held))
        assert len(held) <= 2, f"{len(held)} jobs held by a worker with 2 slots: {held}"
        return jobs, held

    finished = set()
    while len(finished) < 5:
        # Wait until the worker is full (or holds everything that is left), then release one.
        jobs, held = wait_for(lambda: (r := active()) and len(r[1]) == min(2, 5 - len(finished)) and r,
                              15, what="the worker to fill its slots")
        target = held[0]["id"]
        release[target].touch()
        wait_for(lambda: active() and pond.job(target)["state"] == "done", 15, what=f"job {target} to finish")
        finished.add(target)
    assert most[0] == 2
    assert all(j["state"] == "done" for j in all_jobs(pond) if j["id"] in release)


def test_jobs_go_to_the_worker_with_more_free_slots(pool, shared_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    small = pool.worker(pond, orch, concurrency=1)      # enrolled first: first-fit would pick it
    big = pool.worker(pond, orch, concurrency=3)
    assert small.worker_id != big.worker_id
    ids = [pond.submit(blocking_job(shared_path / "release"))["id"] for _ in range(2)]
    held = wait_for(lambda: all(pond.job(i)["state"] in ACTIVE for i in ids) and [pond.job(i) for i in ids],
                    15, what="both jobs to be assigned")
    assert [j["worker"] for j in held] == [big.worker_id, big.worker_id]
    (shared_path / "release").touch()
    for i in ids:
        assert pond.wait_job(i)["state"] == "done"


def test_cancelling_a_queued_job_ends_it_at_once(pool):
    pond = pool.pond()
    job = pond.submit([JOB_PY, "-c", "pass"], tags=["repo:nobody"])
    status, view = pond.api("POST", f"/v1/jobs/{job['id']}/cancel")
    assert status == 200, view
    assert view["state"] == "cancelled"
    assert pond.job(job["id"])["state"] == "cancelled"
    other = pond.submit([JOB_PY, "-c", "pass"], tags=["repo:nobody"])
    cli = pond.cli("cancel", other["id"])
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == f"{other['id']} cancelled"


def test_cancelling_a_running_job_stops_its_process(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job = pond.submit(["sh", "-c", "echo $$ && exec sleep 30"])      # a job may write only its own dirs: it prints
    pid = int(wait_for(lambda: pond.output(job["id"])["stdout"].strip(), 15, what="the job's pid"))
    assert os.path.exists(f"/proc/{pid}")
    assert pond.job(job["id"])["state"] in ACTIVE

    started = time.monotonic()
    status, view = pond.api("POST", f"/v1/jobs/{job['id']}/cancel")
    assert status == 202, view
    assert view["cancel_requested"] is True
    done = pond.wait_job(job["id"], timeout=8)
    assert done["state"] == "cancelled", done
    assert time.monotonic() - started < 8
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, what=f"the job's process {pid} to be gone")


def test_output_larger_than_a_chunk_arrives_intact_and_in_order(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    lines = 300 * 1024 // 8                    # 300 KiB: several 64 KiB chunks
    expected = b"".join(b"%07d\n" % i for i in range(lines))
    job = pond.submit([JOB_PY, "-c", f"import sys\nfor i in range({lines}): sys.stdout.write('%07d\\n' % i)\n"
                                 "sys.stderr.write('end')"])
    assert pond.wait_job(job["id"])["state"] == "done"

    out = pond.output(job["id"])
    assert len(out["stdout"]) == len(expected)
    assert out["stdout"] == expected
    assert out["stderr"] == b"end"
    page = pond.client.get(f"/v1/jobs/{job['id']}/logs")
    seqs = [c["seq"] for c in page["chunks"] if c["stream"] == "stdout"]
    assert len(seqs) > 1 and seqs == list(range(len(seqs)))
    cli = subprocess.run([PY, "-m", "pond", "--state-dir", str(pond.state_dir), "logs", job["id"]],
                         capture_output=True, timeout=30, env=env_for_children())
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == expected


def test_job_environment_is_scrubbed_and_home_is_per_job(pool, tmp_path, shared_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    # A worker whose own environment holds a secret; pool.worker() has no env
    # parameter, so this worker is started here with the harness's Proc.
    state = tmp_path / "envworker"
    state.mkdir()
    env = env_for_children()
    env["WORKER_SECRET"] = "must-not-leak"
    argv = [PY, SWARM, "worker", "--orchestrator", orch.url(), "--state-dir", str(state),
            "--enroll-code", pond.enrollment_code(), "--concurrency", "2", "--claim-wait", "5",
            "--capabilities", "sandbox.process"]
    w = Proc(argv, tmp_path / "envworker.log", env=env)
    pool.procs.append(w)
    worker_id = w.ready().split()[2]
    wait_for(lambda: any(r["id"] == worker_id and r["online"]
                         for r in pond.client.get("/v1/admin/pool/workers")["workers"]), 10, what="worker online")

    # Each job reports its environment and what its HOME held when it started, leaves
    # a file in HOME, and (the first two) waits so that both run at the same time.
    show = [JOB_PY, "-c", "import json, os, sys, time\n"
                      "home = os.environ['HOME']\n"
                      "found = sorted(os.listdir(home))\n"
                      "open(os.path.join(home, 'left-behind'), 'w').write('x')\n"
                      "print(json.dumps({'env': dict(os.environ), 'found': found}), flush=True)\n"
                      "while sys.argv[1:] and not os.path.exists(sys.argv[1]): time.sleep(0.02)"]
    release = shared_path / "release"
    both = [pond.submit(show + [str(release)], env={"JOB_SETTING": "from-the-job"})["id"] for _ in range(2)]
    wait_for(lambda: all(pond.job(i)["state"] == "running" for i in both), 15, what="two jobs running at once")
    release.touch()
    later = pond.submit(show, env={"JOB_SETTING": "from-the-job"})["id"]
    seen = {}
    for job_id in both + [later]:
        assert pond.wait_job(job_id)["state"] == "done"
        seen[job_id] = json.loads(pond.output(job_id)["stdout"])

    for got in seen.values():
        assert "WORKER_SECRET" not in got["env"]
        assert got["env"]["JOB_SETTING"] == "from-the-job"
        assert got["env"]["HOME"] != os.environ.get("HOME")
        assert re.search(r"/slot-[0-9]+/home$", got["env"]["HOME"]), "HOME is the slot's own"
        assert got["found"] == [], "HOME held files when the job started"
    homes = [seen[i]["env"]["HOME"] for i in both]
    assert homes[0] != homes[1], "two jobs running at once share a HOME"


def test_command_that_does_not_exist_fails_with_127(pool):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    job = pond.submit(["/nonexistent/definitely-not-a-command", "--flag"])
    done = pond.wait_job(job["id"])
    assert done["state"] == "failed", done
    assert done["exit_code"] == 127
    assert done["error"] and "definitely-not-a-command" in done["error"]


def test_logs_follow_streams_and_ends_with_the_job(pool, shared_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch)
    release = shared_path / "release"
    job = pond.submit([JOB_PY, "-c", "import os, sys, time\nprint('first', flush=True)\n"
                                 "while not os.path.exists(sys.argv[1]): time.sleep(0.02)\nprint('second')",
                       str(release)])
    follow = subprocess.Popen([PY, "-m", "pond", "--state-dir", str(pond.state_dir), "logs", job["id"], "--follow"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_for_children(),
                              start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)
    try:
        reader.start()
        # 'first' arrives while the job still runs: it is streamed, not printed at the end.
        wait_for(lambda: b"first\n" in lines, 15, what="the first line to be streamed")
        assert follow.poll() is None, "logs --follow ended while the job was running"
        assert pond.job(job["id"])["state"] == "running"
        release.touch()
        assert follow.wait(15) == 0, follow.stderr.read()
        reader.join(5)
        assert lines == [b"first\n", b"second\n"]
        assert pond.job(job["id"])["state"] == "done"
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(5)
        follow.stdout.close()
        follow.stderr.close()


def test_job_claimed_by_a_poll_whose_orchestrator_died_still_runs(pool):
    # A long hold makes it certain that pond still holds the poll of the stopped
    # orchestrator when the job arrives: that poll is the only one, so it claims the job.
    pond = pool.pond(poll_hold=30)
    orch = pool.orchestrator(pond, extra=("--poll-wait", "30"))
    w = pool.worker(pond, orch, tags="repo:acme")
    port = orch.url().rsplit(":", 1)[1]
    assert orch.stop() == 0
    job = pond.submit([JOB_PY, "-c", "print('ran')"], tags=["repo:acme"])

    orch2 = pool.start([a if a != "127.0.0.1:0" else f"127.0.0.1:{port}" for a in orch.argv], "orch")
    assert orch2.url() == orch.url()
    done = wait_end(pond, job["id"], 12, "after the orchestrator restart")
    assert done["state"] == "done" and done["worker"] == w.worker_id, done


def test_job_claimed_for_a_worker_that_stopped_runs_when_it_comes_back(pool):
    # With a long claim wait the orchestrator still holds the stopped worker's claim
    # when the job arrives: that claim is the only one for this worker, so it takes the job.
    pond = pool.pond()
    orch = pool.orchestrator(pond, extra=("--claim-wait", "30"))
    w = pool.worker(pond, orch, tags="repo:acme", extra=("--claim-wait", "30"))
    assert w.stop() == 0
    job = pond.submit([JOB_PY, "-c", "print('ran')"], tags=["repo:acme"])

    back = pool.worker(pond, orch, tags="repo:acme", state=w.state_dir, extra=("--claim-wait", "30"))
    assert back.worker_id == w.worker_id
    done = wait_end(pond, job["id"], 12, "on the restarted worker")
    assert done["state"] == "done", done


def test_a_job_that_leaves_an_undeletable_directory_does_not_break_its_slot(pool):
    """The slot's directory is reused: whatever a job leaves behind must not cost the next job its run."""
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    pool.worker(pond, orch, concurrency=1)
    stuck = ("import os; os.makedirs('locked/deep'); open('locked/deep/f', 'w').write('x');"
             "os.chmod('locked/deep', 0o500); os.chmod('locked', 0o500); print('left a mess')")
    first = pond.wait_job(pond.submit([JOB_PY, "-c", stuck])["id"])
    assert first["state"] == "done", first
    assert pond.output(first["id"])["stdout"] == b"left a mess\n"
    second = pond.wait_job(pond.submit([JOB_PY, "-c", "import os; print(sorted(os.listdir('.')))"])["id"])
    assert second["state"] == "done", second
    assert pond.output(second["id"])["stdout"] == b"[]\n"
