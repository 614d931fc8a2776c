#!/usr/bin/env python3
"""Benchmark a real pond/swarm pool on this machine: pickup latency, throughput, idle CPU.

    python bench/pool.py all                 # pickup, idle, throughput (about a minute)
    python bench/pool.py pickup|throughput|idle|sandbox|groups [--json-out FILE]

It starts, in a temp dir, the three kinds of processes a real pool has, with their
DEFAULT hold and wait times (not the shortened ones tests/conftest.py uses):

    python -m pond serve --bind 127.0.0.1:0
    swarm.py pair; swarm.py serve --bind 127.0.0.1:0
    swarm.py worker --concurrency 2   (two of them)

and drives pond's HTTP API the way a consumer does, over one keep-alive connection
with the admin token. bench/README.md says what each number measures. This is not a
test: it prints numbers (and a JSON line at the end); it never fails on a target.

Every wait has a deadline. The processes are stopped (SIGTERM, then SIGKILL to their
process group) and the temp dir removed at the end, on an error and on Ctrl-C too.
"""

import argparse
import base64
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWARM = ROOT / "swarm.py"
STAMP_SOURCE = ROOT / "bench" / "stamp.c"
OUT_DIR = ROOT / "bench" / "out"                     # gitignored: the compiled stamp lives here
TERMINAL = ("done", "failed", "cancelled")
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 30.0                                  # s for a process to print its ready line
STOP_TIMEOUT = 10.0                                   # s between SIGTERM and SIGKILL
PROFILE_RATE = 100                                    # py-spy samples per second, with --profile

# The targets (printed beside the numbers; the bench itself never fails on them).
TARGET_PICKUP_P50_MS = 5.0
TARGET_PICKUP_P99_MS = 20.0
UNCONFINED = {"profile": "none"}       # the process provider: what this bench measures today
TARGET_THROUGHPUT = 400.0                             # jobs/s, 2,000 /bin/true, first submit to last result
TARGET_IDLE_PCT = 1.0                                 # % of one core, all pool processes together

# Python fallback for stamp.c, when there is no C compiler. Same datagram, same clock;
# python's start-up (~15 ms) lands inside the measured pickup time.
PY_STAMP = ("import time;t=time.monotonic();import os,socket,sys;"
            "socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto("
            "('%s %.9f'%(sys.argv[1],t)).encode(),('127.0.0.1',int(os.environ['STAMP_PORT'])))")


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def wait_for(predicate, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary_ms(seconds):
    ms = [s * 1000.0 for s in seconds]
    return {"n": len(ms), "p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
            "max": max(ms), "min": min(ms), "mean": sum(ms) / len(ms)}


def fmt_summary(s):
    return (f"p50 {s['p50']:7.2f}  p95 {s['p95']:7.2f}  p99 {s['p99']:7.2f}  max {s['max']:7.2f} ms"
            f"  (min {s['min']:.2f}, n={s['n']})")


def verdict(ok):
    return "ok" if ok else "MISSED"


def cpu_ticks(pid, children=False):
    """utime+stime of a process (all its threads) in clock ticks; + its reaped children's if asked."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def tree_ticks(name, pid):
    """CPU ticks of one pool process; a worker's include its spawners (one per slot, its
    children) and the jobs they reaped, and the spawners it reaped; PostgreSQL's (bench/store.py),
    its backends."""
    if not name.startswith(("worker", "postgres")):
        return cpu_ticks(pid)
    ticks = cpu_ticks(pid, children=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    ticks += cpu_ticks(int(entry), children=True)
            except (OSError, IndexError, ValueError):
                pass                            # gone meanwhile
    return ticks


def system_ticks():
    """(busy, steal) clock ticks of the whole machine, all cores, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def other_load(before, after, ours_s, window):
    """% of one core that processes other than ours used during a window (this machine may be shared)."""
    busy = (after[0] - before[0]) / CLK_TCK
    return {"machine_busy_pct": 100.0 * busy / window, "others_pct": max(0.0, 100.0 * (busy - ours_s) / window),
            "steal_pct": 100.0 * (after[1] - before[1]) / CLK_TCK / window}


def fmt_load(load):
    return (f"machine busy {load['machine_busy_pct']:.0f}% of {100 * (os.cpu_count() or 1)}%, of which other "
            f"processes {load['others_pct']:.0f}%; steal {load['steal_pct']:.1f}%")


def machine_info():
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": platform.platform(), "cpu": cpu, "sqlite": sqlite3.sqlite_version,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------------------
# The stamp program: compiled C, or a python -c fallback
# ---------------------------------------------------------------------------


def build_stamp(force_python=False):
    """-> (argv prefix to run as a job, description). Compiles bench/stamp.c into bench/out/stamp."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc and not force_python:
        OUT_DIR.mkdir(exist_ok=True)
        binary = OUT_DIR / "stamp"
        done = subprocess.run([cc, "-O2", "-o", str(binary), str(STAMP_SOURCE)], capture_output=True, text=True,
                              timeout=60)
        if done.returncode == 0:
            return [str(binary)], f"C ({cc} -O2 -> {binary.relative_to(ROOT)})"
        print(f"warning: {cc} could not build {STAMP_SOURCE.name}; using the python fallback:\n{done.stderr}",
              file=sys.stderr)
    reason = "forced by --python-stamp" if force_python else "no working C compiler"
    return ([sys.executable, "-I", "-S", "-c", PY_STAMP],
            f"PYTHON FALLBACK ({reason}): python start-up (~15 ms) is inside every pickup time")


def check_stamp(stamp):
    """Run the stamp once here: it must send its datagram, with a time from our own clock."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        t0 = time.monotonic()
        subprocess.run([*stamp, "selftest"], env={"STAMP_PORT": str(sock.getsockname()[1]), "PATH": "/usr/bin:/bin"},
                       timeout=10, check=True)
        tag, value = sock.recv(512).decode().split()
        if tag != "selftest" or not t0 <= float(value) <= time.monotonic():
            raise BenchError(f"stamp sent {tag} {value}, outside [{t0}, now]: is it reading CLOCK_MONOTONIC?")
        return float(value) - t0


# ---------------------------------------------------------------------------
# HTTP: one keep-alive connection, like a consumer of pond's API
# ---------------------------------------------------------------------------


class Api:
    """A keep-alive HTTP/1.1 connection to pond with TCP_NODELAY and the admin token."""

    def __init__(self, url, token, timeout=60.0):
        hostport = url.split("://", 1)[1]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.timeout = timeout
        self.conn = None

    def connect(self):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def raw(self, method, path, payload=None):
        """-> (status, decoded JSON). payload is already-encoded bytes, so callers can time just the request."""
        for attempt in (1, 2):
            reused = self.conn is not None
            try:
                conn = self.connect()
                conn.request(method, path, body=payload, headers=self.headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()      # pond closed an idle kept-alive connection before reading: safe to resend
                if not (reused and attempt == 1):
                    raise
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        return resp.status, json.loads(data) if data else None

    def call(self, method, path, body=None, expect=200):
        status, data = self.raw(method, path, None if body is None else json.dumps(body).encode())
        if status != expect:
            raise BenchError(f"{method} {path} answered {status}: {data}")
        return data


# ---------------------------------------------------------------------------
# The pool under test
# ---------------------------------------------------------------------------


def child_of(pid, timeout=10.0):
    """The pid of `pid`'s only child (the python process a py-spy wrapper started)."""
    def find():
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        return int(entry)
                except (OSError, IndexError, ValueError):
                    continue
        return None
    return wait_for(find, timeout, f"the child of py-spy {pid}", interval=0.01)


class Proc:
    """A child in its own session; its first stdout line is its ready line, stderr goes to a log file.

    With `profile` (a file name), the child runs under `py-spy record` (py-spy here can only
    sample its own children, not attach to a running process); `pid` is then the python
    process's, and signals go to it, not to py-spy, which writes its profile when the child exits.
    """

    def __init__(self, name, argv, log_path, env, profile=None):
        self.name, self.argv, self.log_path = name, argv, Path(log_path)
        self._log = open(self.log_path, "ab")
        if profile:
            argv = ["py-spy", "record", "--format", "raw", "--rate", str(PROFILE_RATE), "--nonblocking", "--gil",
                    "--output", str(profile), "--", *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                     env=env, cwd=ROOT, start_new_session=True)
        self.pid = child_of(self.proc.pid) if profile else self.proc.pid
        self.lines = []
        self._got = threading.Event()
        self._pump = threading.Thread(target=self._read, daemon=True)   # keeps the pipe from filling up
        self._pump.start()

    def _read(self):
        for line in self.proc.stdout:
            text = line.decode(errors="replace").rstrip("\n")
            if text.strip() and not text.startswith("py-spy> "):   # py-spy's chatter is not a ready line
                self.lines.append(text)
                self._got.set()
        self._got.set()

    def ready(self, timeout=READY_TIMEOUT):
        if not self._got.wait(timeout) or not self.lines:
            raise BenchError(f"{self.name} printed no ready line in {timeout:g} s; its log:\n{self.log_tail()}")
        return self.lines[0]

    def url(self):
        return self.ready().split(" on ", 1)[1].split()[0]

    def alive(self):
        return self.proc.poll() is None and Path(f"/proc/{self.pid}").exists()

    def log_tail(self, n=30):
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def terminate(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def finish(self, timeout=STOP_TIMEOUT):
        """Wait for the exit a terminate() asked for; SIGKILL the whole process group after `timeout`."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"warning: {self.name} (pid {self.pid}) ignored SIGTERM for {timeout:g} s; killing it",
                  file=sys.stderr)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # also whatever it left in its group
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._pump.join(2)
        self.proc.stdout.close()
        self._log.close()


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("POND_URL", "POND_STATE_DIR", "POND_ADMIN_TOKEN", "POND_POLL_HOLD", "POND_BIND", "SWARM_TOKEN",
                "SWARM_ENROLL_CODE", "SWARM_PAIRING_CODE"):
        env.pop(key, None)
    return env


class BenchPool:
    """pond + one orchestrator + two workers (concurrency 2 each), all with default holds and waits."""

    def __init__(self, tmp, workers=2, concurrency=2, profile_dir=None, serve_args=(), database=None, replicas=1,
                 env=None, pond_args=()):
        """`database`: pond on PostgreSQL (a URL without password; `env` carries PGPASSWORD), with
        `replicas` ponds on it; the orchestrator is paired with all of them (it talks to the first)
        and the bench submits through the last, so a submit wakes the poll through NOTIFY."""
        self.database, self.replicas = database, replicas
        self.tmp = Path(tmp)
        self.profile_dir, self.serve_args = profile_dir, tuple(serve_args)    # serve_args: more `swarm.py serve` flags
        self.pond_args = tuple(pond_args)                                      # ... and `pond serve` flags
        self.n_workers, self.concurrency = workers, concurrency
        self.procs = []
        self.env = child_env() if env is None else dict(child_env(), **env)

    def _start(self, name, argv):
        profile = Path(self.profile_dir) / f"{name}.txt" if self.profile_dir else None
        proc = Proc(name, argv, self.tmp / f"{name}.log", self.env, profile)
        self.procs.append(proc)
        return proc

    def start(self):
        pond_dir, urls = self.tmp / "pond", []
        for i in range(1, self.replicas + 1):
            state = pond_dir if i == 1 else self.tmp / f"pond{i}"
            if i > 1:       # a replica: the first one's admin token and credential key
                state.mkdir(mode=0o700)
                for name in ("admin-token", "credential.key"):
                    shutil.copy2(pond_dir / name, state / name)
            store = ("--database", self.database) if self.database else ()
            proc = self._start("pond" if i == 1 else f"pond{i}", [
                sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(state), *store,
                *self.pond_args])
            urls.append(proc.url())
        self.pond = self.procs[0]
        self.url = urls[-1]
        self.token = (pond_dir / "admin-token").read_text().strip()
        api = Api(self.url, self.token)
        try:
            orch_dir = self.tmp / "orch"
            orch_dir.mkdir()
            handle = orch_dir / "backend-handle.json"
            code = api.call("POST", "/v1/admin/pool/pairing-codes", {"name": "bench"}, expect=201)["code"]
            done = subprocess.run([sys.executable, str(SWARM), "pair", "--pond", ",".join(urls), "--code", code,
                                   "--out", str(handle)], capture_output=True, text=True, timeout=30,
                                  env=self.env, cwd=ROOT)
            if done.returncode != 0:
                raise BenchError(f"swarm.py pair failed ({done.returncode}): {done.stderr}")
            token_file = orch_dir / "pool-token"
            token_file.write_text("bench-pool-secret")
            token_file.chmod(0o600)
            self.orch = self._start("orchestrator", [sys.executable, str(SWARM), "serve", "--bind", "127.0.0.1:0",
                                                     "--state-dir", str(orch_dir), "--handle", str(handle),
                                                     "--token-file", str(token_file), *self.serve_args])
            orch_url = self.orch.url()
            self.workers = []
            for i in range(1, self.n_workers + 1):
                code = api.call("POST", "/v1/admin/pool/enrollment-codes", {}, expect=201)["code"]
                w = self._start(f"worker{i}", [sys.executable, str(SWARM), "worker", "--orchestrator", orch_url,
                                               "--state-dir", str(self.tmp / f"worker{i}"), "--tags", "pool:trusted",
                                               "--capabilities", "sandbox.*", "--concurrency", str(self.concurrency),
                                               "--enroll-code", code])
                w.worker_id = w.ready().split()[2]
                self.workers.append(w)
            ids = {w.worker_id for w in self.workers}
            wait_for(lambda: ids <= {w["id"] for w in api.call("GET", "/v1/admin/pool/workers")["workers"]
                                     if w["online"]}, 20, "both workers online in pond")
        finally:
            api.close()

    def pids(self):
        """name -> pid of each pool process, in a stable order."""
        return {p.name: p.pid for p in self.procs}

    def check_alive(self):
        for p in self.procs:
            if not p.alive():
                raise BenchError(f"{p.name} exited with {p.proc.returncode}; its log:\n{p.log_tail()}")

    def stop(self):
        for p in self.procs:            # signal all first, so their shutdowns overlap
            p.terminate()
        for p in reversed(self.procs):
            p.finish()


# ---------------------------------------------------------------------------
# pickup: submit -> the job's command runs
# ---------------------------------------------------------------------------


def wait_stamp(sock, tag, deadline):
    """The time in the datagram the job with `tag` sent; datagrams of earlier jobs are skipped."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"no stamp from job {tag}: did its command run?")
        sock.settimeout(remaining)
        try:
            got, value = sock.recv(512).decode().split()
        except socket.timeout:
            continue
        if got == tag:
            return float(value)


def wait_done(api, job_id, deadline):
    """Follow the job's logs with ?wait= until pond says it ended; -> its state."""
    after = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"job {job_id} did not end in time")
        page = api.call("GET", f"/v1/jobs/{job_id}/logs?after={after}&wait={max(1, min(25, int(remaining)))}")
        if page["state"] in TERMINAL:
            return page["state"]
        after = page["next"]


def pool_cpu_s(pool):
    """CPU seconds of the pool's processes so far (workers with their jobs' processes) and of this driver."""
    t = os.times()
    return sum(tree_ticks(name, pid) for name, pid in pool.pids().items()) / CLK_TCK + t.user + t.system


def bench_pickup(pool, stamp, args, brief=False):
    """submit -> the job's command runs; `brief`: print only the pickup line, the legs and the load."""
    n, warmup = args.pickup_jobs, args.warmup
    if not brief:
        print(f"\npickup: {n} sequential jobs [stamp TAG] after {warmup} warm-up, idle gap U(50,150) ms before each")
    rng = random.Random(args.seed)
    api = Api(pool.url, pool.token)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = str(sock.getsockname()[1])
    started, stored, seen, acked = [], [], [], []
    legs = {"to_created": [], "to_assigned": [], "to_started": [], "to_stored": []}
    states = {}
    try:
        for i in range(warmup + n):
            if i == warmup:
                load_from = (system_ticks(), pool_cpu_s(pool), time.monotonic())
            tag = f"pickup-{i}"
            payload = json.dumps({"command": [*stamp, tag], "env": {"STAMP_PORT": port},
                                  "sandbox": UNCONFINED}).encode()
            time.sleep(rng.uniform(0.050, 0.150))          # not phase-locked to any timer in the pool
            t0_wall = time.time()
            t0 = time.monotonic()
            status, job = api.raw("POST", "/v1/jobs", payload)
            t_ack = time.monotonic()
            if status != 201:
                raise BenchError(f"submit answered {status}: {job}")
            deadline = t0 + args.job_timeout
            t_stamp = wait_stamp(sock, tag, deadline)
            state = wait_done(api, job["id"], deadline)
            t_seen = time.monotonic()
            record = api.call("GET", f"/v1/jobs/{job['id']}")
            states[state] = states.get(state, 0) + 1
            if state != "done":
                raise BenchError(f"job {job['id']} ended {state}: {record.get('error')} (exit {record.get('exit_code')})")
            if i < warmup:
                continue
            started.append(t_stamp - t0)
            stored.append(record["finished_at"] - t0_wall)
            seen.append(t_seen - t0)
            acked.append(t_ack - t0)
            # Where the time goes, on the wall clock pond stamps its record with (time.time() everywhere).
            stamp_wall = t0_wall + (t_stamp - t0)
            legs["to_created"].append(record["created_at"] - t0_wall)
            legs["to_assigned"].append(record["assigned_at"] - record["created_at"])
            legs["to_started"].append(stamp_wall - record["assigned_at"])
            legs["to_stored"].append(record["finished_at"] - stamp_wall)
        load = other_load(load_from[0], system_ticks(), pool_cpu_s(pool) - load_from[1],
                          time.monotonic() - load_from[2])
    finally:
        api.close()
        sock.close()
    res = {"jobs": n, "warmup": warmup, "started_ms": summary_ms(started), "stored_ms": summary_ms(stored),
           "seen_ms": summary_ms(seen), "submit_rtt_ms": summary_ms(acked), "states": states, "load": load,
           "legs_ms": {k: summary_ms(v) for k, v in legs.items()}}
    s = res["started_ms"]
    res["target_met"] = s["p50"] <= TARGET_PICKUP_P50_MS and s["p99"] <= TARGET_PICKUP_P99_MS
    print(f"  submit -> command started    {fmt_summary(s)}")
    if not brief:
        print(f"  submit -> result stored      {fmt_summary(res['stored_ms'])}")
        print(f"  submit -> client sees end    {fmt_summary(res['seen_ms'])}   (logs?wait= returns)")
        print(f"  submit round trip (201)      {fmt_summary(res['submit_rtt_ms'])}")
    lg = res["legs_ms"]
    print(f"  legs, p50 (p95) ms: submit sent -> pond created_at {lg['to_created']['p50']:.2f} "
          f"({lg['to_created']['p95']:.2f}); -> assigned_at {lg['to_assigned']['p50']:.2f} "
          f"({lg['to_assigned']['p95']:.2f}); -> command started {lg['to_started']['p50']:.2f} "
          f"({lg['to_started']['p95']:.2f}); -> finished_at {lg['to_stored']['p50']:.2f} ({lg['to_stored']['p95']:.2f})")
    if not brief:
        print(f"  target: started p50 <= {TARGET_PICKUP_P50_MS:g} ms and p99 <= {TARGET_PICKUP_P99_MS:g} ms: "
              f"{verdict(res['target_met'])}")
    print(f"  during the run: {fmt_load(load)}")
    return res


# ---------------------------------------------------------------------------
# groups: pickup while many requirement groups wait that no worker fits
# ---------------------------------------------------------------------------

TARGET_GROUPS_RATIO = 1.2       # pickup p50 with 50,000 waiting groups, over the empty queue's
GROUPS_BATCH = 1000             # jobs in one submit (pond's MAX_SUBMIT_BATCH)


def queue_groups(pool, first, last, args):
    """Queue jobs first..last-1 through the API, each in a group of its own that no worker of the
    pool fits: a BYO job of its own tenant (tags pool:byo, tenant:gN), as many tenants with their
    own workers elsewhere would queue. Batches of GROUPS_BATCH jobs (POST /v1/jobs with a list),
    from --submitters threads, within --groups-timeout. -> seconds."""
    failures, deadline = [], time.monotonic() + args.groups_timeout
    batches = [range(i, min(i + GROUPS_BATCH, last)) for i in range(first, last, GROUPS_BATCH)]

    def submitter(j):
        api = Api(pool.url, pool.token)
        try:
            for batch in batches[j::args.submitters]:
                if time.monotonic() > deadline:
                    raise BenchError(f"queueing {last - first} jobs took longer than {args.groups_timeout:g} s")
                api.call("POST", "/v1/jobs", [{"command": ["/bin/true"], "sandbox": {"profile": "none", "tier": "byo"},
                                               "tenant": f"g{i}"} for i in batch], expect=201)
        except Exception as e:             # reported by the caller
            failures.append(e)
        finally:
            api.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=submitter, args=(j,), daemon=True) for j in range(args.submitters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    if failures or any(t.is_alive() for t in threads):
        raise BenchError(f"queueing the waiting groups failed: {failures[0] if failures else 'timed out'}")
    return time.monotonic() - t0


def bench_groups(pool, stamp, args):
    """Pickup of an unconstrained job while N jobs of N distinct groups no worker fits wait."""
    levels = sorted(set(args.groups))
    print(f"\ngroups: pickup ({args.pickup_jobs} jobs after {args.warmup} warm-up) while N jobs of N distinct "
          f"groups that no worker fits wait, N = {', '.join(f'{n:,}' for n in levels)}")
    out, queued = [], 0
    for n in levels:
        if n > queued:
            took = queue_groups(pool, queued, n, args)
            print(f"  queued {n - queued:,} more jobs of their own group in {took:.1f} s ({(n - queued) / took:.0f}/s, "
                  f"batches of {GROUPS_BATCH:,}, {args.submitters} submitter(s))")
            queued = n
        api = Api(pool.url, pool.token)
        counts = api.call("GET", "/v1/jobs?limit=1")["counts"]
        api.close()
        if counts.get("queued", 0) != n:
            raise BenchError(f"{counts.get('queued', 0)} jobs are queued, not {n}: did a worker take one?")
        print(f"  {n:,} waiting groups:")
        res = bench_pickup(pool, stamp, args, brief=True)
        out.append({"groups": n, "pickup": res})
        pool.check_alive()
    base = out[0]["pickup"]["started_ms"]["p50"]
    print("  groups   pickup p50     p99   ratio   created -> assigned p50 (p95)   others, % of a core")
    for level in out:
        s, leg = level["pickup"]["started_ms"], level["pickup"]["legs_ms"]["to_assigned"]
        level["ratio_p50"] = s["p50"] / base
        print(f"  {level['groups']:>6,}  {s['p50']:7.2f} {s['p99']:7.2f} ms  {level['ratio_p50']:5.2f}"
              f"   {leg['p50']:7.2f} ({leg['p95']:.2f}) ms{'':15}{level['pickup']['load']['others_pct']:4.0f}")
    last = out[-1]
    met = levels[0] == 0 and last["ratio_p50"] <= TARGET_GROUPS_RATIO
    print(f"  target: p50 with {last['groups']:,} groups <= {TARGET_GROUPS_RATIO:g} x the empty queue's: {verdict(met)}")
    return {"levels": out, "target_met": met}


# ---------------------------------------------------------------------------
# sandbox: pickup under each provider, in the same run, on the same pool
# ---------------------------------------------------------------------------

SANDBOX_PROFILES = (("process", {"profile": "none"}), ("bwrap read", {"profile": "untrusted-code-read"}),
                    ("bwrap write", {"profile": "untrusted-code-write"}))
TARGET_BWRAP_EXTRA_MS = 5.0       # bwrap may add this much to pickup p50, over process


def bench_sandbox(pool, args):
    """submit -> the job's command runs, for `process` and for `bwrap` (read and write profiles).

    The job is `/usr/bin/date +%s.%N`, which every sandbox can run: it prints the wall clock
    at its start, read back from its output afterwards (a sandboxed job reaches no socket of
    ours, so the UDP stamp of `pickup` cannot be used). Two orders, each with every profile:
    `turns`, the profiles one after another, so a slot's next job is rarely like its last and
    bwrap mostly starts cold; and `runs`, ten jobs of one profile in a row, so after a slot's
    first bwrap job the next ones start in the sandbox the slot made ahead (specs/sandbox.md
    §6.1). Either way a drift of the machine's load is shared by all three profiles.
    """
    n = args.sandbox_jobs
    print(f"\nsandbox: {n} sequential jobs per profile and order, after {args.warmup} warm-up; "
          "job /usr/bin/date +%s.%N, idle gap U(50,150) ms")
    rng = random.Random(args.seed)
    api = Api(pool.url, pool.token)
    res = {}
    try:
        run_jobs(api, args, rng, [block for _, block in SANDBOX_PROFILES] * args.warmup)
        for order in ("turns", "runs"):
            per = 1 if order == "turns" else SANDBOX_RUN
            plan = [(name, block) for _ in range(0, n, per) for name, block in SANDBOX_PROFILES for _ in range(per)]
            started = run_jobs(api, args, rng, [block for _, block in plan])
            res[order] = {name: summary_ms([t for (which, _), t in zip(plan, started) if which == name])
                          for name, _ in SANDBOX_PROFILES}
    finally:
        api.close()
    for order, by_name in res.items():
        print(f"  order: {order}" + (f" ({SANDBOX_RUN} jobs of one profile in a row)" if order == "runs" else
                                     " (the profiles one after another)"))
        for name, summary in by_name.items():
            print(f"    {name:12} submit -> command started  {fmt_summary(summary)}")
        extra = max(by_name["bwrap read"]["p50"], by_name["bwrap write"]["p50"]) - by_name["process"]["p50"]
        by_name["bwrap_extra_p50_ms"], by_name["target_met"] = extra, extra <= TARGET_BWRAP_EXTRA_MS
        print(f"    bwrap adds {extra:.2f} ms to pickup p50 over process (target <= {TARGET_BWRAP_EXTRA_MS:g} ms): "
              f"{verdict(by_name['target_met'])}")
    return res


SANDBOX_RUN = 10


def run_jobs(api, args, rng, blocks):
    """One job per sandbox block, one after another: -> [s from submit to the command's start]."""
    started = []
    for block in blocks:
        payload = json.dumps({"command": ["/usr/bin/date", "+%s.%N"], "sandbox": block}).encode()
        time.sleep(rng.uniform(0.050, 0.150))
        t0_wall = time.time()
        status, job = api.raw("POST", "/v1/jobs", payload)
        if status != 201:
            raise BenchError(f"submit answered {status}: {job}")
        state = wait_done(api, job["id"], time.monotonic() + args.job_timeout)
        if state != "done":
            record = api.call("GET", f"/v1/jobs/{job['id']}")
            raise BenchError(f"{block['profile']} job {job['id']} ended {state}: {record.get('error')}")
        chunks = api.call("GET", f"/v1/jobs/{job['id']}/logs")["chunks"]
        out = b"".join(base64.b64decode(c["data"]) for c in chunks if c["stream"] == "stdout")
        started.append(float(out.decode().strip()) - t0_wall)
    return started


# ---------------------------------------------------------------------------
# throughput: N x /bin/true, first submit -> last result stored
# ---------------------------------------------------------------------------


def terminal_count(api):
    counts = api.call("GET", "/v1/jobs?limit=1")["counts"]
    return sum(counts.get(s, 0) for s in TERMINAL), sum(counts.values())


def bench_throughput(pool, args, n=None, block=UNCONFINED):
    n, k, per = n or args.throughput_jobs, args.submitters, args.submit_batch
    print(f"\nthroughput: {n} jobs [/bin/true], sandbox {json.dumps(block)}, submitted as fast as possible "
          f"by {k} client thread(s)" + (f", {per} jobs per POST /v1/jobs" if per > 1 else ""))
    watcher = Api(pool.url, pool.token)
    ended_before, total_before = terminal_count(watcher)
    if ended_before != total_before:
        raise BenchError(f"the pool is not idle: {total_before - ended_before} job(s) not ended")
    payload = json.dumps({"command": ["/bin/true"], "sandbox": block}).encode()
    ids = [None] * n
    mine = [list(range(j, n, k)) for j in range(k)]
    failures = []
    ready = threading.Barrier(k + 1, timeout=30)
    go = threading.Event()
    submits_done = [0.0] * k

    def submitter(j):
        api = Api(pool.url, pool.token)
        try:
            api.connect()                      # connected before the clock starts, like a warm client
            ready.wait()
            go.wait(30)
            for start in range(0, len(mine[j]), per):
                part = mine[j][start:start + per]
                body = payload if per == 1 else b"[" + b",".join([payload] * len(part)) + b"]"
                status, answer = api.raw("POST", "/v1/jobs", body)
                if status != 201:
                    raise BenchError(f"submit answered {status}: {answer}")
                for idx, job in zip(part, answer["jobs"] if per > 1 else [answer]):
                    ids[idx] = job["id"]
            submits_done[j] = time.time()
        except Exception as e:                 # reported by the main thread
            failures.append(e)
        finally:
            api.close()

    threads = [threading.Thread(target=submitter, args=(j,), daemon=True, name=f"submit-{j}") for j in range(k)]
    for t in threads:
        t.start()
    ready.wait()
    pids = pool.pids()
    cpu_before = {name: tree_ticks(name, pid) for name, pid in pids.items()}
    driver_before = os.times()
    sys_before = system_ticks()
    t_start = time.time()                      # wall clock: compared with pond's finished_at (also time.time())
    go.set()
    deadline = time.monotonic() + args.throughput_timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if failures:
        raise BenchError(f"a submitter failed: {failures[0]}")
    if any(t.is_alive() for t in threads):
        raise BenchError(f"submitting {n} jobs took longer than {args.throughput_timeout:g} s")
    submit_end = max(submits_done)
    while True:                                # every 100 ms: have all of them ended?
        ended, _ = terminal_count(watcher)
        if ended - ended_before >= n:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"only {ended - ended_before} of {n} jobs ended within {args.throughput_timeout:g} s")
        pool.check_alive()
        time.sleep(0.1)
    t_seen = time.time()
    cpu_after = {name: tree_ticks(name, pid) for name, pid in pids.items()}
    driver_after = os.times()
    sys_after = system_ticks()
    finished, states = [], {}
    for job_id in ids:                         # pond's own record of when each result was stored
        rec = watcher.call("GET", f"/v1/jobs/{job_id}")
        states[rec["state"]] = states.get(rec["state"], 0) + 1
        finished.append(rec["finished_at"])
    watcher.close()
    elapsed = max(finished) - t_start
    window = t_seen - t_start
    cpu = {name: (cpu_after[name] - cpu_before[name]) / CLK_TCK for name in pids}
    cpu["driver"] = (driver_after.user + driver_after.system) - (driver_before.user + driver_before.system)
    res = {"sandbox": block, "jobs": n, "submitters": k, "seconds": elapsed, "jobs_per_s": n / elapsed,
           "submit_seconds": submit_end - t_start, "submits_per_s": n / (submit_end - t_start),
           "first_result_s": min(finished) - t_start, "states": states,
           "cpu_seconds": cpu, "cpu_window_s": window,
           "cpu_pct": {name: 100.0 * v / window for name, v in cpu.items()},
           "load": other_load(sys_before, sys_after, sum(cpu.values()), window)}
    res["target_met"] = res["jobs_per_s"] >= TARGET_THROUGHPUT and states.get("done", 0) == n
    res["cpu_ms_per_job"] = 1000.0 * sum(v for name, v in cpu.items() if name != "driver") / n
    print(f"  first submit -> last result stored  {elapsed:7.3f} s = {res['jobs_per_s']:7.1f} jobs/s   "
          f"target >= {TARGET_THROUGHPUT:g} jobs/s: {verdict(res['target_met'])}")
    print(f"  submits alone                       {res['submit_seconds']:7.3f} s = {res['submits_per_s']:7.1f} "
          f"submits/s (the pool was running jobs meanwhile)")
    print(f"  job states: {', '.join(f'{s} {c}' for s, c in sorted(states.items()))}")
    print(f"  CPU over the {window:.2f} s run, % of one core (workers include their spawners and jobs), "
          f"{res['cpu_ms_per_job']:.2f} ms of CPU per job:")
    print("    " + "  ".join(f"{name} {pct:.0f}%" for name, pct in res["cpu_pct"].items())
          + f"  | pool total {sum(v for k_, v in res['cpu_pct'].items() if k_ != 'driver'):.0f}%"
          + f" of {100 * (os.cpu_count() or 1)}%")
    print(f"  during the run: {fmt_load(res['load'])}")
    return res


def bench_throughputs(pool, args):
    """Throughput with `profile: none` (the `process` provider), `--reps` times, alternating with
    the peer of `--compare` (same machine, same minutes) and its ratio; then with bwrap."""
    res = {"none": [], "peer": [], "peer_config": None}
    scratch = peer_setup(args) if args.compare else None
    for rep in range(1, args.reps + 1):
        res["none"].append(bench_throughput(pool, args))
        pool.check_alive()
        if scratch:
            res["peer_config"] = PEER_CONFIGS[args.compare]
            res["peer"].append(run_peer(scratch, args, rep))
    ours = percentile([r["jobs_per_s"] for r in res["none"]], 50)
    if res["peer"]:
        theirs = percentile([r["jobs_per_s"] for r in res["peer"]], 50)
        res["ratio"] = ours / theirs
        print(f"\nthroughput vs {args.compare} ({res['peer_config']}, /bin/true, same run, {args.reps} rep(s) "
              f"each, alternating): pond/swarm {ours:.1f} jobs/s, {args.compare} {theirs:.1f} jobs/s: "
              f"ratio {res['ratio']:.2f}x   target >= 1.0x: {verdict(res['ratio'] >= 1.0)}")
    if args.sandboxed_jobs:
        res["bwrap"] = bench_throughput(pool, args, args.sandboxed_jobs, {"profile": "untrusted-code-write"})
    return res


# ---------------------------------------------------------------------------
# --compare: a peer queue in the same run (../shared/peers-bench, from a scratch copy)
# ---------------------------------------------------------------------------

PEERS = ROOT.parent / "shared" / "peers-bench"
PEER_CONFIGS = {"huey": "huey-tuned"}      # SqliteHuey, 2 workers, 10 ms poll: the fastest huey set-up
PEER_PACKAGES = {"huey": ["huey"]}


def peer_setup(args):
    """A scratch copy of the peers' scripts, outside this repository, with a venv of its own
    (made once, from the package index): -> its directory."""
    src, scratch = Path(args.peers), Path(args.peers_scratch)
    if not (src / "qbench.py").is_file():
        raise BenchError(f"--compare needs the peers' benchmarks at {src} (../shared/peers-bench)")
    scratch.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.py"):
        shutil.copy2(f, scratch / f.name)
    py = scratch / "venv" / "bin" / "python"
    if not py.exists():
        print(f"\n{args.compare}: making a venv in {scratch} (once): pip install {' '.join(PEER_PACKAGES[args.compare])}")
        subprocess.run([sys.executable, "-m", "venv", str(scratch / "venv")], check=True, timeout=120)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES[args.compare]], check=True, timeout=600)
    return scratch


def run_peer(scratch, args, rep):
    """One throughput run of the peer (its own driver, qbench.py): /bin/true jobs, as ours."""
    config = PEER_CONFIGS[args.compare]
    print(f"\n{args.compare} ({config}): {args.throughput_jobs} jobs [/bin/true in a subprocess], its own "
          f"driver {scratch}/qbench.py")
    sys_before, t0 = system_ticks(), time.monotonic()
    done = subprocess.run([str(scratch / "venv" / "bin" / "python"), "qbench.py", config, str(rep), "--phases", "tp",
                           "--n", str(args.throughput_jobs), "--out", str(scratch / "results.jsonl")],
                          cwd=scratch, capture_output=True, text=True, timeout=args.throughput_timeout * 3)
    window = time.monotonic() - t0
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    found = [r for r in lines if r.get("metric") == "throughput" and r.get("kind") == "sub"]
    if done.returncode != 0 or not found:
        raise BenchError(f"{config} failed ({done.returncode}): {done.stderr[-2000:]}")
    res = found[0]
    busy = (system_ticks()[0] - sys_before[0]) / CLK_TCK
    res["machine_busy_pct"] = 100.0 * busy / window
    print(f"  first enqueue -> last job ended     {res['wall_s']:7.3f} s = {res['jobs_per_s']:7.1f} jobs/s  "
          f"(machine busy {res['machine_busy_pct']:.0f}% over its whole run, no-op phase included)")
    return res


# ---------------------------------------------------------------------------
# idle: CPU of the pool's processes with no jobs
# ---------------------------------------------------------------------------


def bench_idle(pool, args):
    print(f"\nidle: no jobs; settle {args.idle_settle:g} s, then CPU (utime+stime, all threads) over "
          f"{args.idle_seconds:g} s")
    api = Api(pool.url, pool.token)
    ended, total = terminal_count(api)
    api.close()                                # no request of ours during the window
    if ended != total:
        raise BenchError(f"the pool is not idle: {total - ended} job(s) not ended")
    time.sleep(args.idle_settle)
    pids = pool.pids()
    before = {name: cpu_ticks(pid) for name, pid in pids.items()}
    sys_before, driver_before = system_ticks(), os.times()
    t0 = time.monotonic()
    time.sleep(args.idle_seconds)
    after = {name: cpu_ticks(pid) for name, pid in pids.items()}
    sys_after, driver_after = system_ticks(), os.times()
    window = time.monotonic() - t0
    pool.check_alive()
    pct = {name: 100.0 * (after[name] - before[name]) / CLK_TCK / window for name in pids}
    ours = (sum(after.values()) - sum(before.values())) / CLK_TCK + (
        driver_after.user + driver_after.system - driver_before.user - driver_before.system)
    res = {"seconds": window, "cpu_pct": pct, "total_pct": sum(pct.values()),
           "resolution_pct": 100.0 / CLK_TCK / window, "load": other_load(sys_before, sys_after, ours, window)}
    res["target_met"] = res["total_pct"] < TARGET_IDLE_PCT
    for name, value in pct.items():
        print(f"  {name:<14} {value:6.2f} % of one core")
    print(f"  {'total':<14} {res['total_pct']:6.2f} %   (resolution {res['resolution_pct']:.2f} %)   "
          f"target < {TARGET_IDLE_PCT:g} %: {verdict(res['target_met'])}")
    print(f"  during the window: {fmt_load(res['load'])}")
    return res


# ---------------------------------------------------------------------------
# --profile: where each process spent its samples
# ---------------------------------------------------------------------------


def _frame_name(frame):
    """'func (path/file.py:123)' -> 'func (file.py)': one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})" if where else name


def summarize_profile(path, top):
    """-> (samples, [(self samples, function)], [(inclusive samples, function)]) from py-spy's raw output."""
    own, incl, total = {}, {}, 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        total += n
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    by = lambda d: sorted(((v, k) for k, v in d.items()), reverse=True)[:top]
    return total, by(own), by(incl)


def print_profiles(profile_dir, top=12):
    out = {}
    print(f"\nprofiles (py-spy, {PROFILE_RATE} samples/s of each busy thread, whole process life) in {profile_dir}:")
    for path in sorted(Path(profile_dir).glob("*.txt")):
        total, own, incl = summarize_profile(path, top)
        out[path.stem] = {"samples": total, "self": [[n, f] for n, f in own], "inclusive": [[n, f] for n, f in incl]}
        print(f"  {path.stem}: {total} samples (~{total / PROFILE_RATE:.1f} s of busy thread time)")
        for n, f in own:
            print(f"    self {100.0 * n / max(total, 1):5.1f}%  {f}")
        print("    inclusive: " + "; ".join(f"{f} {100.0 * n / max(total, 1):.0f}%" for n, f in incl[:top]))
    return out


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark a real pond/swarm pool (see bench/README.md).")
    p.add_argument("what", choices=("pickup", "throughput", "idle", "sandbox", "groups", "all"))
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON line of results to FILE")
    p.add_argument("--pickup-jobs", type=int, default=200)
    p.add_argument("--sandbox-jobs", type=int, default=100, help="jobs per profile for `sandbox` (default %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up jobs before pickup (default %(default)s)")
    p.add_argument("--throughput-jobs", type=int, default=2000)
    p.add_argument("--submitters", type=int, default=1, help="client threads submitting (default %(default)s)")
    p.add_argument("--submit-batch", type=int, default=1, metavar="N", help="jobs per POST /v1/jobs in "
                   "throughput (a list; default %(default)s: one job per request)")
    p.add_argument("--assign-ahead", type=int, metavar="N", help="pond serve --assign-ahead N: jobs "
                   "each worker may hold beyond its slots (default: pond's)")
    p.add_argument("--compare", choices=sorted(PEER_CONFIGS), help="also run this peer's throughput, alternating "
                   "with ours, and print the ratio (its scripts: --peers, run from a copy in --peers-scratch)")
    p.add_argument("--reps", type=int, default=1, help="throughput runs of each (default %(default)s; the medians "
                   "are compared)")
    p.add_argument("--peers", default=str(PEERS), help="the peers' benchmarks (default ../shared/peers-bench)")
    p.add_argument("--peers-scratch", default=os.path.join(tempfile.gettempdir(), "pond-bench-peers"),
                   help="where they are copied and get their venv (default %(default)s)")
    p.add_argument("--sandboxed-jobs", type=int, default=500, help="throughput jobs under bwrap, after the others "
                   "(untrusted-code-write; 0: none; default %(default)s)")
    p.add_argument("--throughput-timeout", type=float, default=240.0, help="s for the whole run (default %(default)s)")
    p.add_argument("--job-timeout", type=float, default=30.0, help="s one pickup job may take (default %(default)s)")
    p.add_argument("--groups", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1000, 5000, 50000],
                   help="waiting groups for `groups`, comma-separated (default 0,1000,5000,50000)")
    p.add_argument("--groups-timeout", type=float, default=900.0,
                   help="s to queue the waiting groups of one level (default %(default)s)")
    p.add_argument("--idle-settle", type=float, default=3.0)
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=None, help="seed for the idle gaps")
    p.add_argument("--python-stamp", action="store_true", help="use the python stamp even if cc works")
    p.add_argument("--profile", metavar="DIR", help="run the pool's processes under `py-spy record` and write "
                   "their raw profiles to DIR (best with `throughput`: the profile covers each process's whole life)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, pond.db) and print its path")
    args = p.parse_args(argv)
    if args.pickup_jobs < 1 or args.throughput_jobs < 1 or args.submitters < 1 or args.warmup < 0 or args.reps < 1 \
            or args.sandboxed_jobs < 0 or not 1 <= args.submit_batch <= 1000:
        p.error("job counts and --submitters must be positive")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)    # clean up on kill as on Ctrl-C
    signal.signal(signal.SIGHUP, _raise_interrupt)
    results = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "json_out"}}
    m = results["machine"]
    print(f"machine: nproc {m['nproc']} (affinity {m['affinity']}), {m['cpu']}, {m['platform']}")
    print(f"         {m['implementation']} {m['python']}, SQLite {m['sqlite']}, load average {m['loadavg']}")
    stamp, how = build_stamp(args.python_stamp)
    results["stamp"] = how
    print(f"stamp:   {how}; exec -> stamp here {1000 * check_stamp(stamp):.2f} ms")
    if args.profile:
        if not shutil.which("py-spy"):
            print("error: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
            return 2
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="pond-bench-")
    pool = BenchPool(tmp, profile_dir=args.profile,
                     pond_args=() if args.assign_ahead is None else ("--assign-ahead", str(args.assign_ahead)))
    code = 0
    try:
        t = time.monotonic()
        pool.start()
        print(f"pool:    started in {time.monotonic() - t:.1f} s in {tmp}: "
              + ", ".join(f"{name} pid {pid}" for name, pid in pool.pids().items()))
        print("         default holds: pond poll hold 25 s, orchestrator claim wait 25 s; 2 workers x concurrency 2"
              + ("" if args.assign_ahead is None else f"; pond --assign-ahead {args.assign_ahead}"))
        if args.what in ("pickup", "all"):
            results["pickup"] = bench_pickup(pool, stamp, args)
            pool.check_alive()
        if args.what in ("sandbox", "all"):
            results["sandbox"] = bench_sandbox(pool, args)
            pool.check_alive()
        if args.what in ("idle", "all"):
            results["idle"] = bench_idle(pool, args)
        if args.what == "groups":         # not in `all`: the jobs it leaves queued would spoil idle and throughput
            results["groups"] = bench_groups(pool, stamp, args)
        if args.what in ("throughput", "all"):
            results["throughput"] = bench_throughputs(pool, args)
            pool.check_alive()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        results["error"] = str(e)
        code = 1
    except Exception as e:              # a bug here: still stop the pool and say what happened
        import traceback
        traceback.print_exc()
        results["error"] = f"{e.__class__.__name__}: {e}"
        code = 1
    except KeyboardInterrupt:
        print("interrupted; stopping the pool", file=sys.stderr)
        results["error"] = "interrupted"
        code = 130
    finally:
        stop_pool(pool, tmp, args)
    return report(results, args, code)


def stop_pool(pool, tmp, args):
    """Stop the pool (a second Ctrl-C must not skip the clean-up) and remove its temp dir unless --keep."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pool.stop()
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def report(results, args, code):
    """The profiles (with --profile), then the JSON line of results, also to --json-out; -> code."""
    if args.profile:
        results["profiles"] = print_profiles(args.profile)
    line = json.dumps(results, separators=(",", ":"))
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
