"""GET /metrics is Prometheus text that Prometheus's own parser reads (issue 12): jobs and workers
by state, requests and their latency by route, pickup latency, attempts pond ended. A real pond;
the test speaks the orchestrator's side through the API."""

from prometheus_client.parser import text_string_to_metric_families


def scrape(pond):
    status, text = pond.api("GET", "/metrics", token=None)
    assert status == 200, text
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families, name, sample=None, **labels):
    family = families[name.removesuffix("_total")]       # the parser names a counter's family without _total
    for s in family.samples:
        if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample or name} {labels} in {family.samples}")


def test_metrics_parse_and_count_jobs_requests_pickup_and_evictions(pool):
    pond = pool.pond(extra=("--allow-unsigned-results",))
    token = pond.bare_orchestrator()             # one online worker without keys: allowed here
    job = pond.submit(["true"])
    worker = pond.client.get("/v1/admin/pool/workers")["workers"][0]["id"]
    status, answer = pond.api("POST", "/v1/orch/poll", {"wait": 0}, token=token)
    assert status == 200 and [a["job_id"] for a in answer["jobs"]] == [job["id"]], answer
    assert pond.api("POST", f"/v1/admin/pool/workers/{worker}/evict", {})[0] == 200
    pond.api("GET", "/v1/no/such/route")

    families = scrape(pond)
    assert families["pond_jobs"].type == "gauge"
    assert value(families, "pond_jobs", state="queued") == 1              # evicted: queued again
    assert value(families, "pond_workers", online="true") == 1
    assert value(families, "pond_workers_evicted") == 1
    assert value(families, "pond_orchestrators") == 1

    pickup = families["pond_pickup_seconds"]
    assert pickup.type == "histogram"
    assert value(families, "pond_pickup_seconds", "pond_pickup_seconds_count") == 1
    assert value(families, "pond_pickup_seconds", "pond_pickup_seconds_bucket", le="+Inf") == 1
    assert 0 <= value(families, "pond_pickup_seconds", "pond_pickup_seconds_sum") < 30

    assert value(families, "pond_attempts_ended_total", "pond_attempts_ended_total", reason="evicted") == 1
    assert value(families, "pond_results_refused_total", "pond_results_refused_total") == 0
    assert value(families, "pond_http_route_requests_total", "pond_http_route_requests_total",
                 route="jobs.submit", code="201") == 1
    assert value(families, "pond_http_route_requests_total", "pond_http_route_requests_total",
                 route="none", code="404") == 1
    latency = families["pond_http_request_duration_seconds"]
    assert latency.type == "histogram"
    assert value(families, "pond_http_request_duration_seconds", "pond_http_request_duration_seconds_count",
                 route="dispatch.poll") == 1
    buckets = [s for s in latency.samples if s.name.endswith("_bucket") and s.labels["route"] == "jobs.submit"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets) and buckets[-1].labels["le"] == "+Inf"


def test_queue_depth_pickup_and_attempts_by_requirement_group_name_no_tag(pool):
    """Per requirement group: queue depth and pickup latency, labelled by the group's hashed key (a
    job's view shows it as "group"), never by its tags, since /metrics needs no token; attempts."""
    pond = pool.pond(extra=("--allow-unsigned-results",))
    token = pond.bare_orchestrator()
    taken = pond.submit(["true"])
    waiting = [pond.submit(["true"], tags=["tenant-acme-secret"]) for _ in range(3)]   # no worker has the tag
    status, answer = pond.api("POST", "/v1/orch/poll", {"wait": 0}, token=token)
    assert status == 200 and [a["job_id"] for a in answer["jobs"]] == [taken["id"]], answer
    group, other = pond.job(waiting[0]["id"])["group"], pond.job(taken["id"])["group"]
    assert len(group) == 12 and int(group, 16) >= 0 and group != other
    assert {pond.job(j["id"])["group"] for j in waiting} == {group}

    status, text = pond.api("GET", "/metrics", token=None)
    assert status == 200 and "tenant-acme-secret" not in text and "sandbox.process" not in text
    families = scrape(pond)
    assert value(families, "pond_queue_depth", group=group) == 3
    assert value(families, "pond_queue_depth", group="other") == 0
    assert value(families, "pond_queue_groups") == 1
    assert value(families, "pond_group_pickup_seconds", "pond_group_pickup_seconds_count", group=other) == 1
    assert value(families, "pond_group_pickup_seconds", "pond_group_pickup_seconds_bucket",
                 group=other, le="+Inf") == 1
    assert not [s for s in families["pond_group_pickup_seconds"].samples if s.labels["group"] == group]
    assert value(families, "pond_attempts_total") == 1


def test_group_series_are_bounded_the_rest_summed_as_other(pool):
    """More groups than GROUP_SERIES: the largest keep their series, the rest add up under other."""
    from pond.metrics import GROUP_SERIES
    pond = pool.pond()
    for i in range(GROUP_SERIES + 5):
        for _ in range(2 if i < GROUP_SERIES else 1):       # the first GROUP_SERIES groups are the largest
            pond.submit(["true"], tags=[f"tenant-{i}"])
    families = scrape(pond)
    depth = {s.labels["group"]: s.value for s in families["pond_queue_depth"].samples}
    assert len(depth) == GROUP_SERIES + 1 and depth["other"] == 5
    assert sum(depth.values()) == 2 * GROUP_SERIES + 5
    assert value(families, "pond_queue_groups") == GROUP_SERIES + 5


def test_pickup_series_are_bounded_too():
    """The first GROUP_SERIES groups picked up keep a pickup series; later ones add to other; retries
    count as attempts, not pickups."""
    from pond.metrics import GROUP_SERIES, Metrics, group_label
    m = Metrics()
    for i in range(GROUP_SERIES + 5):
        m.assigned({"attempt": 0, "created_at": 0.0, "req_key": f'[["tenant:{i}"],[]]'}, 2.0)
    m.assigned({"attempt": 1, "created_at": 0.0, "req_key": '[["tenant:0"],[]]'}, 9.0)
    assert len(m.group_pickup) == GROUP_SERIES + 1 and m.group_pickup["other"].lines("x")[-1] == "x_count 5"
    assert m.group_pickup[group_label('[["tenant:0"],[]]')].lines("x")[-1] == "x_count 1"
    assert dict(m.attempts.items()) == {"assigned": GROUP_SERIES + 6}
