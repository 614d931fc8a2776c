// pond's web console (docs/operator-guide.md §2.15): jobs, one job live, the pools, and the
// operator's actions, through pond's JSON API (specs/protocol.md §9) with the admin token the
// operator typed, which this tab keeps in its sessionStorage.
//
// Every value from pond (a job's command, its output, a name) enters the page as text: through
// text nodes and textContent, never innerHTML. The page's Content-Security-Policy allows no
// script but this file.
"use strict";

const TOKEN_KEY = "pond-admin-token";
const STATES = ["queued", "assigned", "running", "done", "failed", "cancelled"];
const TERMINAL = new Set(["done", "failed", "cancelled"]);
const REFRESH_MS = 3000;       // how often a list or a job's facts are read again
const LOG_WAIT = 25;           // s a logs long-poll may be held (pond holds it at most its --poll-hold)
const RETRY_MS = 2000;         // after a failed logs read

const main = document.getElementById("view");
const errorBox = document.getElementById("error");
const filters = {state: "", tag: "", worker: ""};     // the jobs list's, kept while the tab lives
let current = null;                                   // the view shown now: {stop()}
let errorFrom = null;                                 // what showed the error shown now (showError)

// -- the page's building blocks ----------------------------------------------------------------

// An element; each child a node, or a value shown as text (null/undefined/false: nothing).
function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function table(id, headings, body) {
  return h("table", {id}, h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))), body);
}

function facts(pairs) {
  return pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {"data-fact": k}, v)]);
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const ago = Math.round(Date.now() / 1000 - seconds);
  const at = new Date(seconds * 1000).toLocaleString();
  return ago >= 0 ? `${at} (${ago < 120 ? ago + " s" : Math.round(ago / 60) + " min"} ago)` : at;
}

function yesNo(value) {
  return value === null || value === undefined ? "-" : h("span", {class: value ? "yes" : "no"}, value ? "yes" : "no");
}

// One argument as a shell would need it typed; control characters shown as \n, \t, \r or \xNN.
function shellWord(arg) {
  const named = {"\n": "\\n", "\t": "\\t", "\r": "\\r"};
  const shown = String(arg).replace(/[\x00-\x1f\x7f]/g,
                                    (c) => named[c] || "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
  return /^[A-Za-z0-9@%+=:,./_-]+$/.test(shown) ? shown : "'" + shown.replace(/'/g, "'\"'\"'") + "'";
}

function commandLine(argv) {
  return (argv || []).map(shellWord).join(" ");
}

function list(values) {
  return values && values.length ? values.join(", ") : "-";
}

function jobLink(id) {
  return h("a", {href: "#job/" + encodeURIComponent(id)}, id);
}

// -- talking to pond ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
    this.hint = error.hint || "";
  }
}

async function api(method, path, body, signal) {
  const headers = {Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY)};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let answer;
  try {
    answer = await fetch(path, {method, headers, signal, cache: "no-store", credentials: "omit",
                                body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, {code: "unreachable", message: `pond did not answer ${method} ${path}`,
                           hint: "is pond running? This page tries again by itself"});
  }
  let data = null;
  try {
    data = await answer.json();
  } catch (e) {
    data = null;
  }
  if (answer.ok && data !== null) return data;
  const error = (data && data.error) || {code: "http_" + answer.status, message: `pond answered ${answer.status}`};
  if (answer.status === 401 || error.code === "token_invalid") {
    signOut(new ApiError(answer.status, error));
  }
  throw new ApiError(answer.status, error);
}

// `from`: "refresh" for a failed periodic read (the next good one clears it), else "action".
function showError(e, from = "action") {
  if (e && e.name === "AbortError") return;
  errorBox.textContent = e instanceof ApiError ? `${e.message}${e.hint ? " (" + e.hint + ")" : ""}` : String(e);
  errorBox.hidden = false;
  errorFrom = from;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
  errorFrom = null;
}

// Run `read` now and every `ms` until stopped. Its failures are shown until a read succeeds; a
// call of now() during a read runs one more read after it, so the newest answer is shown last.
function every(ms, read) {
  let timer = null;
  let stopped = false;
  let busy = false;
  let again = false;
  async function tick() {
    clearTimeout(timer);
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      await read();
      if (!stopped && errorFrom === "refresh") clearError();
    } catch (e) {
      if (!stopped) showError(e, "refresh");
    }
    busy = false;
    if (stopped) return;
    if (again) {
      again = false;
      tick();
    } else {
      timer = setTimeout(tick, ms);
    }
  }
  tick();
  return {stop() { stopped = true; clearTimeout(timer); }, now: tick};
}

// -- the token -----------------------------------------------------------------------------------

function signOut(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (current) current.stop();
  current = null;
  main.replaceChildren();
  document.getElementById("nav").hidden = true;
  document.getElementById("login").hidden = false;
  if (why) showError(why);
  else clearError();
}

document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  const token = input.value.trim();
  input.value = "";
  if (!token) return;
  if (!/^[\x21-\x7e]+$/.test(token)) {         // fetch cannot send it; pond's tokens are printable ASCII
    showError(new ApiError(0, {code: "token_invalid", message: "the admin token is not valid: it has a character "
                               + "no token has", hint: "paste the contents of <state-dir>/admin-token"}));
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("GET", "/v1/jobs?limit=1");     // a wrong token is refused here, before any view
  } catch (e) {
    if (sessionStorage.getItem(TOKEN_KEY)) showError(e);
    return;
  }
  clearError();
  route();
});

document.getElementById("forget").addEventListener("click", () => signOut(null));

// -- the views -----------------------------------------------------------------------------------

function route() {
  if (current) current.stop();
  current = null;
  main.replaceChildren();
  clearError();
  if (!sessionStorage.getItem(TOKEN_KEY)) return signOut(null);
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  const [name, arg] = location.hash.replace(/^#/, "").split("/", 2);
  if (name === "job" && /^[A-Za-z0-9_-]{1,64}$/.test(arg || "")) current = jobView(arg);
  else if (name === "pools") current = poolsView();
  else current = jobsView();
}

function jobsView() {
  const state = h("select", {id: "filter-state"}, h("option", {value: ""}, "any"),
                  STATES.map((s) => h("option", {value: s}, s)));
  const tag = h("input", {id: "filter-tag", placeholder: "repo:acme"});
  const worker = h("input", {id: "filter-worker", placeholder: "a worker id"});
  state.value = filters.state;
  tag.value = filters.tag;
  worker.value = filters.worker;
  const counts = h("p", {class: "counts", id: "job-counts"});
  const rows = h("tbody");
  main.append(h("h2", {}, "Jobs"),
              h("form", {class: "filters", onsubmit: (e) => e.preventDefault()},
                h("label", {}, "State", state), h("label", {}, "Tag", tag), h("label", {}, "Worker", worker)),
              counts,
              table("jobs", ["Job", "Name", "State", "Command", "Tags", "Worker", "Attempt", "Exit", "Created"], rows));
  const poller = every(REFRESH_MS, async () => {
    const query = new URLSearchParams({limit: "1000"});
    for (const key of ["state", "tag", "worker"]) if (filters[key]) query.set(key, filters[key]);
    const data = await api("GET", "/v1/jobs?" + query);      // pond filters them all, newest first
    const shown = data.jobs;
    rows.replaceChildren(...shown.map((j) => h("tr", {"data-job": j.id},
      h("td", {class: "mono"}, jobLink(j.id)), h("td", {}, j.name || "-"),
      h("td", {class: "state-" + j.state}, j.state), h("td", {class: "command mono"}, commandLine(j.command)),
      h("td", {}, list(j.tags)), h("td", {class: "mono"}, j.worker || "-"), h("td", {}, j.attempt),
      h("td", {}, j.exit_code ?? "-"), h("td", {}, when(j.created_at)))));
    counts.textContent = STATES.map((s) => `${s} ${data.counts[s] || 0}`).join(" · ")
      + ` — showing ${shown.length}` + (data.jobs.length === 1000 ? " (the newest 1000 that match)" : "");
  });
  const changed = () => {
    Object.assign(filters, {state: state.value, tag: tag.value.trim(), worker: worker.value.trim()});
    poller.now();
  };
  state.addEventListener("change", changed);
  tag.addEventListener("change", changed);
  worker.addEventListener("change", changed);
  return poller;
}

function jobView(id) {
  const aborter = new AbortController();
  const factList = h("dl", {class: "facts", id: "job-facts"});
  const cancel = h("button", {type: "button", id: "cancel", class: "danger"}, "Cancel this job");
  const waiting = h("p", {id: "job-waiting"});
  const pools = h("tbody");
  const explainBox = h("div", {id: "job-explain", hidden: ""}, h("h3", {}, "Why it waits, pool by pool"),
                       table("explain", ["Orchestrator", "Name", "Workers", "Verdict", "Reason"], pools));
  const events = h("tbody");
  const output = h("pre", {id: "job-output"});
  const outputState = h("p", {class: "muted", id: "output-state"}, "following…");
  main.append(h("h2", {}, "Job ", h("span", {class: "mono"}, id)), h("p", {}, cancel), factList, waiting,
              explainBox, h("h3", {}, "Events"), table("job-events", ["At", "Event", "Attempt", "Detail"], events),
              h("h3", {}, "Output"), output, outputState);
  let attestation = null;

  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel job ${id}?`)) return;
    cancel.disabled = true;
    try {
      await api("POST", `/v1/jobs/${encodeURIComponent(id)}/cancel`, {});
      poller.now();
    } catch (e) {
      showError(e);
      cancel.disabled = false;
    }
  });

  const poller = every(REFRESH_MS, async () => {
    const job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`, undefined, aborter.signal);
    if (job.attested && attestation === null) {
      attestation = await api("GET", `/v1/jobs/${encodeURIComponent(id)}/attestation`, undefined, aborter.signal);
    }
    showJob(job);
    if (job.state === "queued") {
      const why = await api("GET", `/v1/jobs/${encodeURIComponent(id)}/explain`, undefined, aborter.signal);
      pools.replaceChildren(...why.pools.map((p) => h("tr", {},
        h("td", {class: "mono"}, p.orchestrator), h("td", {}, p.name), h("td", {}, p.workers),
        h("td", {}, p.verdict), h("td", {}, p.reason))));
    }
    explainBox.hidden = job.state !== "queued";
  });

  function showJob(job) {
    const done = TERMINAL.has(job.state);
    cancel.hidden = done;
    cancel.disabled = Boolean(job.cancel_requested);
    const attested = job.attested === null ? "no result yet"
      : job.attested ? h("span", {class: "yes"}, "yes: signed by the worker's pinned key and verified",
                         attestation ? ` (fingerprint ${attestation.fingerprint})` : "")
      : h("span", {class: "no"}, "no: recorded unsigned");
    const dropped = Object.entries(job.dropped || {}).filter(([, n]) => n).map(([s, n]) => `${s} ${n} bytes`);
    factList.replaceChildren(...facts([
      ["state", h("span", {class: "state-" + job.state, id: "job-state"}, job.state,
                  job.cancel_requested && !done ? " (cancel requested)" : "")],
      ["name", job.name],
      ["command", h("code", {id: "job-command"}, commandLine(job.command))],
      ["tags", list(job.tags)],
      ["capabilities", list(job.capabilities)],
      ["sandbox", job.sandbox ? `profile ${job.sandbox.profile}, backend ${job.sandbox.backend}`
        + `; allowed hosts ${list(job.sandbox.allow_hosts)}; limits ${JSON.stringify(job.sandbox.limits || {})}` : null],
      ["credential", job.credential],
      ["worker", job.worker],
      ["orchestrator", job.orchestrator],
      ["attempt", `${job.attempt} (retries left ${job.retries_left})`],
      ["exit code", job.exit_code],
      ["error", job.error],
      ["attested", attested],
      ["created", when(job.created_at)],
      ["assigned", job.assigned_at && when(job.assigned_at)],
      ["started", job.started_at && when(job.started_at)],
      ["finished", job.finished_at && when(job.finished_at)],
      ["duration", job.started_at && job.finished_at ? `${(job.finished_at - job.started_at).toFixed(1)} s` : null],
      ["dropped", dropped.length ? dropped.join(", ") + " past the log cap" : null],
      ["agent", job.agent ? `harness ${job.agent.harness}, model ${job.agent.model}` : null],
      ["usage", job.usage ? `${job.usage.calls.length} model call(s), ${job.usage.input_tokens} input and `
        + `${job.usage.output_tokens} output tokens, cost ${job.usage.cost}`
        + (job.usage.attested ? " (as the worker signed it)" : " (not signed yet)") : null],
      ...(job.warnings || []).map((w) => ["warning", w.message]),
    ]));
    waiting.textContent = job.waiting ? "Waiting: " + job.waiting.reason : "";
    const none = job.events && job.events.length ? [] : [h("tr", {}, h("td", {colspan: "4", class: "muted"}, "none"))];
    events.replaceChildren(...none, ...(job.events || []).map((e) => h("tr", {},
      h("td", {}, when(e.at)), h("td", {}, e.event), h("td", {}, e.attempt ?? "-"),
      h("td", {}, e.message || Object.entries(e).filter(([k]) => !["at", "event", "job", "attempt"].includes(k))
        .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ")))));
  }

  // The output, following as it arrives: a logs long-poll from the last cursor, until pond says
  // the job's output is complete. A new attempt's output starts under a line that says so.
  async function follow() {
    const decoders = {};
    let after = 0;
    let attempt = null;
    while (!aborter.signal.aborted) {
      let page;
      try {
        page = await api("GET", `/v1/jobs/${encodeURIComponent(id)}/logs?after=${after}&wait=${LOG_WAIT}`,
                         undefined, aborter.signal);
      } catch (e) {
        if (aborter.signal.aborted || e.status === 404) return;     // a job that does not exist: said once
        showError(e, "refresh");
        await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
        continue;
      }
      const atEnd = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
      for (const chunk of page.chunks) {
        if (chunk.attempt !== attempt) {
          attempt = chunk.attempt;
          output.append(h("span", {class: "attempt"}, `── attempt ${attempt} ──\n`));
        }
        const key = chunk.attempt + "/" + chunk.stream;
        decoders[key] = decoders[key] || new TextDecoder("utf-8");
        const bytes = Uint8Array.from(atob(chunk.data), (c) => c.charCodeAt(0));
        output.append(h("span", {class: chunk.stream}, decoders[key].decode(bytes, {stream: true})));
      }
      if (atEnd) output.scrollTop = output.scrollHeight;
      after = page.next;
      if (page.complete) {
        outputState.textContent = `complete: the job is ${page.state}`
          + (page.exit_code === null ? "" : `, exit code ${page.exit_code}`);
        poller.now();
        return;
      }
    }
  }
  follow();
  return {stop() { aborter.abort(); poller.stop(); }};
}

function poolsView() {
  const orchestrators = h("tbody");
  const workers = h("tbody");
  const drain = h("input", {type: "checkbox", id: "evict-drain"});
  main.append(h("h2", {}, "Orchestrators"),
              table("orchestrators", ["Orchestrator", "Name", "Scope", "Workers online", "Paired", "Last seen",
                                      "Revoked"], orchestrators),
              h("h2", {}, "Workers"),
              h("p", {}, h("label", {class: "inline"}, h("span", {}, "Evict lets running jobs finish (drain)"), drain)),
              table("workers", ["Worker", "Name", "Orchestrator", "Online", "Tags", "Capabilities", "Sandboxes",
                                "Slots", "Last seen", "Pinned", "State", ""], workers),
              mintForms());
  const poller = every(REFRESH_MS, async () => {
    const [o, w] = await Promise.all([api("GET", "/v1/admin/pool/orchestrators"),
                                      api("GET", "/v1/admin/pool/workers")]);
    orchestrators.replaceChildren(...o.orchestrators.map((b) => h("tr", {"data-orchestrator": b.id},
      h("td", {class: "mono"}, b.id), h("td", {}, b.name), h("td", {}, list(b.scope)),
      h("td", {}, `${b.workers_online} of ${b.workers}`), h("td", {}, when(b.created_at)),
      h("td", {}, when(b.last_seen)), h("td", {}, b.revoked_at ? when(b.revoked_at) : "-"))));
    workers.replaceChildren(...w.workers.map((x) => {
      const sandboxes = x.capabilities.filter((c) => c.startsWith("sandbox.")).map((c) => c.slice(8));
      const state = x.revoked ? "revoked" : x.evicted ? (x.drain ? "evicted (draining)" : "evicted") : "enrolled";
      const evict = h("button", {type: "button", class: "danger evict"}, "Evict");
      evict.hidden = x.evicted || x.revoked;
      evict.addEventListener("click", () => evictWorker(x.id, drain.checked, evict, poller));
      return h("tr", {"data-worker": x.id},
        h("td", {class: "mono"}, x.id), h("td", {}, x.name || "-"), h("td", {class: "mono"}, x.orchestrator),
        h("td", {}, yesNo(x.online)), h("td", {}, list(x.tags)),
        h("td", {}, list(x.capabilities.filter((c) => !c.startsWith("sandbox.")))), h("td", {}, list(sandboxes)),
        h("td", {}, `${x.running} running of ${x.slots}`), h("td", {}, when(x.last_seen)), h("td", {}, yesNo(x.pinned)),
        h("td", {}, state, x.last_event ? h("div", {class: "muted"}, x.last_event) : null), h("td", {}, evict));
    }));
  });
  return poller;
}

async function evictWorker(id, drain, button, poller) {
  if (!confirm(`Evict worker ${id}?` + (drain ? " Its running jobs finish first." : " Its jobs are queued again."))) {
    return;
  }
  button.disabled = true;
  try {
    await api("POST", `/v1/admin/pool/workers/${encodeURIComponent(id)}/evict`, {drain});
  } catch (e) {
    showError(e);
  }
  poller.now();
}

// Comma-separated words -> a list, or undefined when there are none: an empty field sends nothing,
// so pond applies its default, never an empty restriction.
function words(input) {
  const list = input.value.split(",").map((s) => s.trim()).filter(Boolean);
  return list.length ? list : undefined;
}

function mintForms() {
  const pairName = h("input", {id: "pair-name", placeholder: "orchestrator"});
  const pairScope = h("input", {id: "pair-scope", placeholder: "pool:trusted, repo:acme"});
  const enrollUses = h("input", {id: "enroll-uses", type: "number", min: "1", value: "1"});
  const enrollTags = h("input", {id: "enroll-tags", placeholder: "repo:acme"});
  const enrollPrint = h("input", {id: "enroll-fingerprint", placeholder: "from swarm.py worker --print-fingerprint"});
  const minted = h("div", {id: "minted"});

  async function mint(path, body, what) {
    try {
      const code = await api("POST", path, body);
      minted.replaceChildren(h("p", {}, `${what}, shown once, valid until ${when(code.expires_at)}: `,
                               h("span", {class: "code mono", id: "minted-code"}, code.code)));
    } catch (e) {
      showError(e);
    }
  }

  return h("section", {}, h("h2", {}, "Codes"),
    h("form", {class: "mint", id: "mint-pairing", onsubmit: (e) => {
      e.preventDefault();
      mint("/v1/admin/pool/pairing-codes", {name: pairName.value.trim() || undefined, scope: words(pairScope)},
           "Pairing code for swarm.py pair --code");
    }}, h("label", {}, "Orchestrator name", pairName), h("label", {}, "Scope (tags)", pairScope),
      h("button", {type: "submit"}, "Mint a pairing code")),
    h("form", {class: "mint", id: "mint-enrollment", onsubmit: (e) => {
      e.preventDefault();
      mint("/v1/admin/pool/enrollment-codes", {uses: Number(enrollUses.value) || 1, tags: words(enrollTags),
                                               fingerprint: enrollPrint.value.trim() || undefined},
           "Enrollment code for swarm.py worker --enroll-code");
    }}, h("label", {}, "Uses", enrollUses), h("label", {}, "Tags allowed", enrollTags),
      h("label", {}, "Worker fingerprint", enrollPrint), h("button", {type: "submit"}, "Mint an enrollment code")),
    minted);
}

window.addEventListener("hashchange", route);
route();
