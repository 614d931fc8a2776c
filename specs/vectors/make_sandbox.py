#!/usr/bin/env python3
"""Regenerate specs/vectors/sandbox.json: a submitted sandbox block, the block pond stores,
what a worker enforces from it, and the exact stdin an external provider reads
(specs/sandbox.md §1, §6.4). Both implementations are run: pond.sandbox for the first
step, swarm.py for the others; tests/test_vectors.py checks the file against both.

    python specs/vectors/make_sandbox.py [OUT]
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import swarm                      # noqa: E402
from pond import sandbox          # noqa: E402

SLOT = {"root": "/var/lib/swarm/sandbox-0123456789ab/slot-0", "uid": 3000000}
CASES = [
    {"name": "write job with overrides and allow_hosts",
     "submitted": {"profile": "untrusted-code-write", "overrides": {"memory": "1G", "cpus": 1, "pids": 128,
                                                                    "tmpfs_size": "256M", "timeout": 600},
                   "allow_hosts": ["Example.org", "*.example.net", "example.org"]},
     "command": ["make", "test"], "env": {"SWARM_JOB_ID": "j_1", "SWARM_ATTEMPT": "1", "TOKEN": "t0ps3cret"}},
    {"name": "read job, defaults", "submitted": {"profile": "untrusted-code-read"},
     "command": ["sh", "-c", "grep -r TODO ."], "env": {"SWARM_JOB_ID": "j_2", "SWARM_ATTEMPT": "1"}},
    {"name": "write job on a helper provider, tier byo", "tenant": "acme",
     "submitted": {"profile": "untrusted-code-write", "tier": "byo", "backend": "gvisor"},
     "command": ["pytest", "-q"], "env": {"SWARM_JOB_ID": "j_3", "SWARM_ATTEMPT": "2"}},
]


def case(c):
    parsed = sandbox.parse(c["submitted"], c.get("tenant"))
    conf = swarm.confinement(parsed.block)
    slot = swarm.Slot(Path(SLOT["root"]), SLOT["uid"])
    env = swarm.sandbox_env(conf, c["env"], slot, conf["backend"])
    stdin = swarm.canonical_json(swarm.helper_spec(conf, c["command"], env, slot)).decode()
    return {"name": c["name"], "tenant": c.get("tenant"), "submitted": c["submitted"], "stored": parsed.block,
            "required_tags": list(parsed.tags), "required_capabilities": list(parsed.capabilities),
            "enforced": dict(conf, allow_hosts=list(conf["allow_hosts"])), "command": c["command"],
            "job_env": c["env"], "slot": SLOT, "helper_stdin": stdin}


def main(out=ROOT / "specs" / "vectors" / "sandbox.json"):
    Path(out).write_text(json.dumps({"cases": [case(c) for c in CASES]}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
