#!/usr/bin/env python3
"""A 50 MB source tree through pond: pack + encrypt, upload, and what a source adds to a job.

    python bench/bundles.py [--mb 50] [--reps 3] [--keep]

Prints MB/s of each step on this machine and one JSON line at the end. The pool is
bench/pool.py's (pond, one orchestrator, one worker with default holds); jobs run under
profile none (`true`), so the difference between a job with the source and one without is
the source's cost: redeem, read through the orchestrator, sha256, decrypt, unpack, and the
baseline git tree for changes.patch (and the empty patch after). Decrypt and unpack are
also timed alone, in this process, with swarm.py's own functions.
"""

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pool import Api, BenchPool, machine_info, wait_for  # noqa: E402

import swarm  # noqa: E402
from pond import bundles  # noqa: E402
from pond.client import Client  # noqa: E402


def make_tree(root, mb, seed=1):
    """`mb` MB in files of 256 KiB under a few directories: half random bytes, half text."""
    rng = random.Random(seed)
    line = b"def handler(request):  # a line of code that compresses the way code does\n"
    n = mb * 4
    for i in range(n):
        d = root / f"pkg{i % 16}"
        d.mkdir(exist_ok=True)
        data = rng.randbytes(256 * 1024) if i % 2 else (line * (256 * 1024 // len(line) + 1))[:256 * 1024]
        (d / f"f{i}.dat").write_bytes(data)
    return n


def run_job(api, body):
    t0 = time.monotonic()
    job = api.call("POST", "/v1/jobs", body, expect=201)
    done = wait_for(lambda: (j := api.call("GET", f"/v1/jobs/{job['id']}"))["state"] in ("done", "failed") and j,
                    120, f"job {job['id']}")
    if done["state"] != "done":
        raise SystemExit(f"job {job['id']} {done['state']}: {done['error']}")
    return time.monotonic() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-bundles-"))
    results = {"machine": machine_info(), "mb": args.mb}
    pool = BenchPool(tmp, workers=1, concurrency=1)
    try:
        tree = tmp / "tree"
        tree.mkdir()
        results["files"] = make_tree(tree, args.mb)
        size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())
        t0 = time.monotonic()
        packed = bundles.pack_and_encrypt(tree, tmp / "bundle")
        results["pack_encrypt_s"] = time.monotonic() - t0
        pool.start()
        client = Client(pool.url, pool.token, timeout=120)
        t0 = time.monotonic()
        bundle_id = bundles.upload(client, tmp / "bundle", packed["key"], packed["sha256"], packed["size"])
        results["upload_s"] = time.monotonic() - t0
        results["bundle_bytes"] = packed["size"]
        t0 = time.monotonic()
        with open(tmp / "bundle", "rb") as src, open(tmp / "plain.tgz", "wb") as dst:
            swarm.decrypt_bundle(packed["key"], src, dst, packed["size"])
        results["decrypt_s"] = time.monotonic() - t0
        (tmp / "unpacked").mkdir()
        t0 = time.monotonic()
        swarm.extract_source(tmp / "plain.tgz", tmp / "unpacked")
        results["unpack_s"] = time.monotonic() - t0
        api = Api(pool.url, pool.token, timeout=120)
        base = {"command": ["true"], "sandbox": {"profile": "none"}}
        run_job(api, base)                                    # warm up
        results["job_s"] = sorted(run_job(api, base) for _ in range(args.reps))
        results["job_with_source_s"] = sorted(run_job(api, dict(base, source={"bundle": bundle_id}))
                                              for _ in range(args.reps))
        api.close()
    finally:
        pool.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    mb = size / 1e6
    print(f"tree: {results['files']} files, {mb:.1f} MB; bundle {results['bundle_bytes'] / 1e6:.1f} MB")
    for step in ("pack_encrypt", "upload", "decrypt", "unpack"):
        print(f"{step:14} {results[step + '_s']:6.2f} s  {mb / results[step + '_s']:7.1f} MB/s (of the tree)")
    median = lambda xs: xs[len(xs) // 2]  # noqa: E731
    plain, with_source = median(results["job_s"]), median(results["job_with_source_s"])
    print(f"job (true) submit -> done: median {plain:.2f} s without the source, {with_source:.2f} s with it "
          f"(+{with_source - plain:.2f} s)")
    print(json.dumps(results, separators=(",", ":")))


if __name__ == "__main__":
    main()
