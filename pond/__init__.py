"""pond: the control plane of a pull-based worker pool.

pond keeps jobs, pairing and enrollment codes, orchestrator bindings and workers in
SQLite in its state directory, and serves three APIs over HTTP (see specs/):

  /v1/jobs    submit, inspect, logs, cancel             (admin token)
  /v1/admin   pairing and enrollment codes, pool views   (admin token)
  /v1/orch    the orchestrator protocol                  (per-binding token)

pond never dials out: orchestrators long-poll it.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["__version__", "PROTOCOL_VERSION"]
