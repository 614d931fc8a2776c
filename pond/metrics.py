"""GET /metrics: pond's numbers in the Prometheus text format (version 0.0.4), open like /healthz.

Gauges are read from the store when scraped (jobs by state, workers by state, orchestrators);
counters and histograms are kept in memory since pond started (requests and their latency by
route, pickup latency, attempts made and ended by pond, results refused), so they start from zero
after a restart, which Prometheus reads as a counter reset. specs/protocol.md §9 lists them.

A requirement group (the jobs with the same tags and capabilities) is labelled by
group_label(): 12 hex of its key's SHA-256, never its tags, since /metrics needs no token.
`GET /v1/jobs/{id}` shows a job's group under that name. At most GROUP_SERIES groups get a
series of their own; the rest are summed under group="other", so 50,000 tenant groups cost a
scrape GROUP_SERIES + 1 series.
"""

import hashlib
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PICKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
GROUP_SERIES = 20       # requirement groups with series of their own, per family; the rest: group="other"


def group_label(req_key):
    """A requirement group's name on /metrics and in a job's view: no tag or capability shows."""
    return hashlib.sha256(req_key.encode()).hexdigest()[:12]


class Histogram:
    """Observations in fixed buckets, safe from any thread: per bucket, how many were at most it."""

    def __init__(self, bounds):
        self.bounds, self._lock = bounds, threading.Lock()
        self._counts, self._sum, self._n = [0] * len(bounds), 0.0, 0

    def observe(self, value):
        with self._lock:
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._n += 1

    def lines(self, name, labels=""):
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._n
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.bounds, counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {n}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {total:.6f}", f"{name}_count{suffix} {n}"]


class Counters:
    """Named counts, safe from any thread."""

    def __init__(self):
        self._lock, self._n = threading.Lock(), {}

    def add(self, key, n=1):
        with self._lock:
            self._n[key] = self._n.get(key, 0) + n

    def items(self):
        with self._lock:
            return sorted(self._n.items())


class Metrics:
    """What pond counts as it runs: one per pond (server.Pond.metrics)."""

    def __init__(self):
        self.requests = Counters()           # (route, status) -> n
        self.latency = {}                    # route -> Histogram
        self.pickup = Histogram(PICKUP_BUCKETS)     # submit -> first assignment, s
        self.group_pickup = {}               # group_label (the first GROUP_SERIES seen) or "other" -> Histogram
        self.attempts = Counters()           # "assigned" -> attempts handed out
        self.ended = Counters()              # attempts pond ended, by event: lease_expired, withdrawn, ...
        self.refused = Counters()            # results refused: attestation_failed
        self.collected = Counters()          # blobs the reaper deleted past their retention: bundle, artifact
        self._lock = threading.Lock()

    def request(self, route, status, seconds):
        self.requests.add((route, status))
        histogram = self.latency.get(route)
        if histogram is None:
            with self._lock:
                histogram = self.latency.setdefault(route, Histogram(LATENCY_BUCKETS))
        histogram.observe(seconds)

    def assigned(self, job, now):
        """An attempt was handed out (dispatch._assign): counted; a job's first one times its pickup,
        overall and in its requirement group's series (the first GROUP_SERIES groups seen, or "other")."""
        self.attempts.add("assigned")
        if job["attempt"]:
            return
        self.pickup.observe(now - job["created_at"])
        label = group_label(job["req_key"])
        histogram = self.group_pickup.get(label)
        if histogram is None:
            with self._lock:
                if label not in self.group_pickup and len(self.group_pickup) >= GROUP_SERIES:
                    label = "other"
                histogram = self.group_pickup.setdefault(label, Histogram(PICKUP_BUCKETS))
        histogram.observe(now - job["created_at"])


def render(pond, req):
    """The /metrics page: HELP and TYPE before each family, one sample a line."""
    m, workers, counts = pond.metrics, pond.store.workers(), pond.store.job_counts()
    groups, largest = pond.store.queue_depths(GROUP_SERIES)
    out = []

    def family(name, kind, helptext, samples):
        out.extend([f"# HELP {name} {helptext}", f"# TYPE {name} {kind}", *samples])

    family("pond_jobs", "gauge", "Jobs by state.",
           [f'pond_jobs{{state="{state}"}} {n}' for state, n in sorted(counts.items())])
    family("pond_queue_groups", "gauge", "Requirement groups with a queued job.", [f"pond_queue_groups {groups}"])
    family("pond_queue_depth", "gauge",
           f"Queued jobs by requirement group: the {GROUP_SERIES} largest, the rest summed as other.",
           [f'pond_queue_depth{{group="{group_label(key)}"}} {n}' for key, n in largest]
           + [f'pond_queue_depth{{group="other"}} {counts.get("queued", 0) - sum(n for _, n in largest)}'])
    family("pond_workers", "gauge", "Enrolled workers, online or not.",
           [f'pond_workers{{online="true"}} {sum(1 for w in workers if w["online"])}',
            f'pond_workers{{online="false"}} {sum(1 for w in workers if not w["online"])}'])
    family("pond_workers_evicted", "gauge", "Workers evicted by an operator.",
           [f"pond_workers_evicted {sum(1 for w in workers if w['evicted_at'] is not None)}"])
    family("pond_workers_revoked", "gauge", "Workers revoked by an operator.",
           [f"pond_workers_revoked {sum(1 for w in workers if w['revoked_at'] is not None)}"])
    family("pond_orchestrators", "gauge", "Paired orchestrators.", [f"pond_orchestrators {len(pond.store.bindings())}"])
    family("pond_http_requests_total", "counter", "Requests answered.", [f"pond_http_requests_total {pond.requests}"])
    family("pond_http_route_requests_total", "counter", "Requests answered, by route and status.",
           [f'pond_http_route_requests_total{{route="{route}",code="{status}"}} {n}'
            for (route, status), n in m.requests.items()])
    samples = []
    for route, histogram in sorted(m.latency.items()):
        samples += histogram.lines("pond_http_request_duration_seconds", f'route="{route}"')
    family("pond_http_request_duration_seconds", "histogram",
           "Seconds from a request's head to its answer (a held poll: its hold), by route.", samples)
    family("pond_pickup_seconds", "histogram", "Seconds from a job's submit to the assignment of its first attempt.",
           m.pickup.lines("pond_pickup_seconds"))
    samples = []
    for label, histogram in sorted(m.group_pickup.items()):
        samples += histogram.lines("pond_group_pickup_seconds", f'group="{label}"')
    family("pond_group_pickup_seconds", "histogram", f"pond_pickup_seconds by requirement group: the first "
           f"{GROUP_SERIES} groups picked up since start, the rest as other.", samples)
    family("pond_attempts_total", "counter", "Attempts handed out to workers (a job's retries each count).",
           [f"pond_attempts_total {dict(m.attempts.items()).get('assigned', 0)}"])
    family("pond_attempts_ended_total", "counter", "Attempts pond took away from their worker, by why.",
           [f'pond_attempts_ended_total{{reason="{reason}"}} {n}' for reason, n in m.ended.items()])
    family("pond_results_refused_total", "counter", "Final reports whose signed result did not verify.",
           [f"pond_results_refused_total {sum(n for _, n in m.refused.items())}"])
    family("pond_blobs_collected_total", "counter", "Bundles and artifacts deleted past their retention, by kind.",
           [f'pond_blobs_collected_total{{kind="{kind}"}} {n}' for kind, n in m.collected.items()])
    family("pond_group_matches_total", "counter", "Requirement groups matched against a pool's workers.",
           [f"pond_group_matches_total {pond.fits.checks}"])
    return 200, "\n".join(out) + "\n"
