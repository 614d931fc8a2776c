"""The web console at /ui/ (issue 12; pond/console.py, pond/ui/): its files and headers, then the
page in a real headless Chromium against a real pool: a job's output follows live, a cancel
works, a bad token is refused, and a job's command and output show as text, never as HTML.

The browser is Debian's chromium and chromium-driver (.ci/run installs them), driven by
Selenium (the test extra). Missing, the browser tests fail and say what to install: they never
skip, so a missing browser cannot pass for a working console.
"""

import http.client
import importlib
import os
import re
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import JOB_PY, ROOT, wait_for
from pond import console

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Prints a line with markup in it, waits for its gate file, prints another: the first line must
# reach the page while the job still runs. Its last argument is markup too.
LIVE_JOB = ("import os, sys, time\n"
            "print('first line <b>bold</b>', flush=True)\n"
            "while not os.path.exists(sys.argv[1]): time.sleep(0.05)\n"
            "print('second line', flush=True)\n")
MARKUP = "<script>window.pwned = 1</script><img src=x>"


def get(url, path, token=None):
    """(status, headers, body bytes) of a GET, headers by lower-cased name."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


class Tags(HTMLParser):
    """Each start tag of a page with its attributes, and whether any script has a body."""

    def __init__(self):
        super().__init__()
        self.tags, self.inline_script, self._in_script = [], False, False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        self.inline_script |= self._in_script and bool(data.strip())


def test_console_files_are_served_with_strict_headers_and_hold_no_data(pool):
    pond = pool.pond()
    status, head, page = get(pond.url, "/ui/")
    assert status == 200 and head["content-type"] == "text/html; charset=utf-8", (status, head)
    csp = dict(part.strip().split(" ", 1) for part in head["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'", csp
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'", csp
    assert "unsafe" not in head["content-security-policy"]
    assert head["x-content-type-options"] == "nosniff" and head["cache-control"] == "no-store", head
    assert head["x-frame-options"] == "DENY", head
    assert get(pond.url, "/ui")[2] == get(pond.url, "/ui/index.html")[2] == page
    for path, kind in (("/ui/console.js", "text/javascript"), ("/ui/console.css", "text/css")):
        status, head, body = get(pond.url, path)
        assert status == 200 and head["content-type"].startswith(kind) and body, (path, status, head)
        assert "frame-ancestors 'none'" in head["content-security-policy"], head
    # Only the console's own files: nothing else of the package, the state dir or the disk.
    for path in ("/ui/console.py", "/ui/../pond.db", "/ui/%2e%2e/admin-token", "/ui/x/index.html", "/uiindex.html"):
        status, head, body = get(pond.url, path)
        assert status == 404 and b'"not_found"' in body, (path, status, body)
    # The page itself carries no data and no token; the data answers are never cached.
    assert pond.token.encode() not in page
    status, head, _ = get(pond.url, "/v1/jobs", token=pond.token)
    assert status == 200 and head["cache-control"] == "no-store" and head["x-content-type-options"] == "nosniff"


def test_console_page_has_no_inline_script_and_inserts_no_html():
    """What the CSP forbids would break the page, and HTML built from strings would run a job's markup."""
    tags = Tags()
    tags.feed((console.UI_DIR / "index.html").read_text())
    assert not tags.inline_script
    scripts = [attrs for tag, attrs in tags.tags if tag == "script"]
    assert scripts == [{"src": "/ui/console.js", "defer": None}], scripts
    assert not [(tag, a) for tag, attrs in tags.tags for a in attrs if a == "style" or a.startswith("on")]
    source = "\n".join(line for line in (console.UI_DIR / "console.js").read_text().splitlines()
                       if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "localStorage", ".style"):
        assert sink not in source, f"console.js uses {sink}"


def test_every_console_file_is_served_and_ships_in_the_package():
    files = {p.name for p in console.UI_DIR.iterdir()}
    assert files == set(console.FILES.values()), files
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pond"]
    unshipped = [f for f in files if not any(fnmatch(f"ui/{f}", glob) for glob in data)]
    assert not unshipped, f"pyproject.toml's package-data leaves out {unshipped}: pip install would not ship them"


# -- in the browser ----------------------------------------------------------------------------------

def _selenium():
    try:
        return importlib.import_module("selenium.webdriver"), importlib.import_module("selenium.common")
    except ImportError as e:
        pytest.fail(f"selenium is not installed ({e}): install the test extra: pip install -e '.[test]'",
                    pytrace=False)


def chromium_processes(profile):
    """Live processes started with this profile dir: the browser and its helpers."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(profile).encode() in argv and state != "Z":
            found.append(int(pid))
    return found


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with a profile of its own; quit, and waited for, after the test."""
    webdriver, common = _selenium()
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)",
                    pytrace=False)
    profile = tmp_path / "chromium-profile"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: Chromium's own sandbox refuses to start as root, as CI runs; it only visits the test's pond.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.errors = common.exceptions
    try:
        yield driver
    finally:
        driver.quit()
        wait_for(lambda: not chromium_processes(profile), 10, what="chromium to exit")


def text(driver, css):
    """The text of the first element `css` finds; "" while there is none (or it was just replaced)."""
    try:
        return driver.find_element("css selector", css).text
    except (driver.errors.NoSuchElementException, driver.errors.StaleElementReferenceException):
        return ""


def click(driver, css, confirm=False):
    wait_for(lambda: driver.find_element("css selector", css).is_displayed(), 10, what=f"{css} to show")
    driver.find_element("css selector", css).click()
    if confirm:
        wait_for(lambda: _alert(driver), 5, what="the confirmation").accept()


def _alert(driver):
    try:
        return driver.switch_to.alert
    except driver.errors.NoAlertPresentException:
        return None


def sign_in(driver, pond, token):
    driver.get(pond.url + "/ui/")
    wait_for(lambda: driver.find_element("id", "token").is_displayed(), 10, what="the token form")
    driver.find_element("id", "token").send_keys(token)
    driver.find_element("css selector", "#login-form button").click()


def csp_violations(driver):
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def test_console_refuses_a_bad_token_and_shows_nothing(pool, browser):
    pond = pool.pond()
    pond.submit(["true"], name="secret-name")
    sign_in(browser, pond, "pond_admin_not-the-token")
    wait_for(lambda: "admin token is not valid" in text(browser, "#error"), 10, what="the refusal")
    assert browser.find_element("id", "login").is_displayed()
    assert not browser.find_element("id", "nav").is_displayed()
    assert text(browser, "main") == "" and "secret-name" not in browser.page_source
    assert browser.execute_script("return sessionStorage.getItem('pond-admin-token')") is None
    sign_in(browser, pond, pond.token)            # the right one opens the jobs list
    wait_for(lambda: "secret-name" in text(browser, "#jobs"), 10, what="the job in the list")
    assert not browser.find_element("id", "error").is_displayed()
    assert not csp_violations(browser)


def test_console_follows_a_job_live_cancels_one_and_runs_the_pool(pool, browser, shared_path):
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch)
    gate = shared_path / "gate"
    live = pond.submit([JOB_PY, "-c", LIVE_JOB, str(gate), MARKUP], name="live")
    sign_in(browser, pond, pond.token)
    wait_for(lambda: live["id"] in text(browser, "#jobs"), 10, what="the job in the list")
    assert MARKUP in text(browser, "#jobs")            # the command, as text

    # One job, live: its first line shows while it still runs, the second once it is let go.
    browser.get(f"{pond.url}/ui/#job/{live['id']}")
    wait_for(lambda: "first line <b>bold</b>" in text(browser, "#job-output"), 15, what="the first line, live")
    assert pond.job(live["id"])["state"] in ("assigned", "running")
    assert MARKUP in text(browser, "#job-command")
    assert not browser.find_elements("css selector", "#job-output b, #job-command script, #job-command img, #jobs img")
    assert browser.execute_script("return window.pwned") is None
    gate.touch()
    wait_for(lambda: "second line" in text(browser, "#job-output"), 15, what="the second line")
    wait_for(lambda: "exit code 0" in text(browser, "#output-state"), 10, what="the output to be complete")
    wait_for(lambda: text(browser, "#job-state") == "done", 10, what="the page to say done")
    wait_for(lambda: text(browser, "[data-fact=attested]").startswith("yes"), 10, what="the attestation")
    assert text(browser, "#job-output").index("attempt 1") < text(browser, "#job-output").index("first line")

    # A job no worker can take says why, pool by pool.
    nowhere = pond.submit(["true"], tags=["repo:nobody"])
    browser.get(f"{pond.url}/ui/#job/{nowhere['id']}")
    wait_for(lambda: "no worker with tag repo:nobody" in text(browser, "#job-waiting"), 10, what="the waiting reason")
    wait_for(lambda: "lacks" in text(browser, "#explain tbody"), 10, what="the explain table")

    # Cancel a running job from its page.
    stuck = pond.submit([JOB_PY, "-c", "import time\ntime.sleep(120)"], name="stuck")
    wait_for(lambda: pond.job(stuck["id"])["state"] == "running", 15, what="the job to run")
    browser.get(f"{pond.url}/ui/#job/{stuck['id']}")
    wait_for(lambda: text(browser, "#job-state") == "running", 10, what="the page to say running")
    click(browser, "#cancel", confirm=True)
    pond.wait_job(stuck["id"], states=("cancelled",), timeout=20)
    wait_for(lambda: text(browser, "#job-state") == "cancelled", 10, what="the page to say cancelled")

    # The list filtered by state.
    browser.get(f"{pond.url}/ui/#jobs")
    wait_for(lambda: live["id"] in text(browser, "#jobs"), 10, what="the list")
    browser.find_element("css selector", "#filter-state option[value=cancelled]").click()
    wait_for(lambda: live["id"] not in text(browser, "#jobs") and stuck["id"] in text(browser, "#jobs"), 10,
             what="the list filtered by state")

    # The pools: the worker with its sandboxes; mint a code; evict the worker.
    browser.get(f"{pond.url}/ui/#pools")
    row = f"#workers tr[data-worker={worker.worker_id}]"
    wait_for(lambda: "process" in text(browser, row), 10, what="the worker's row")
    assert "yes" in text(browser, row) and "0 running of 1" in text(browser, row)
    assert orch.state_dir and "1 of 1" in text(browser, "#orchestrators tbody")
    click(browser, "#mint-enrollment button")
    code = wait_for(lambda: text(browser, "#minted-code"), 10, what="a minted code")
    assert re.fullmatch(r"[A-Z0-9]{4}(-[A-Z0-9]{4})+", code), code
    click(browser, f"{row} button.evict", confirm=True)
    wait_for(lambda: any(w["id"] == worker.worker_id and w["evicted"]
                         for w in pond.client.get("/v1/admin/pool/workers")["workers"]), 10, what="the eviction")
    wait_for(lambda: "evicted" in text(browser, row), 10, what="the page to say evicted")
    assert not browser.find_element("id", "error").is_displayed(), text(browser, "#error")
    assert not csp_violations(browser)


def test_console_filters_by_tag_and_worker_over_all_jobs_not_the_newest_thousand(pool, browser):
    """pond filters (GET /v1/jobs?tag=&worker=): a job older than the newest 1000 is still found."""
    pond = pool.pond()
    orch = pool.orchestrator(pond)
    worker = pool.worker(pond, orch, tags="repo:old")
    old = pond.submit(["true"], tags=["repo:old"])
    pond.wait_job(old["id"])
    newer = [{"command": ["true"], "tags": ["repo:nobody"], "sandbox": {"profile": "none"}}] * 1000
    assert pond.api("POST", "/v1/jobs", newer)[0] == 201                   # no worker takes them
    row = f"#jobs tr[data-job={old['id']}]"          # looked up by selector: the text of 1000 rows is slow
    sign_in(browser, pond, pond.token)
    wait_for(lambda: "showing 1000 " in text(browser, "#job-counts"), 15, what="the newest 1000")
    assert not browser.find_elements("css selector", row)
    for field, value in (("tag", "repo:old"), ("worker", worker.worker_id)):
        box = browser.find_element("id", f"filter-{field}")
        box.send_keys(value + "\n")
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)
        wait_for(lambda: text(browser, "#job-counts").endswith("showing 1") and browser.find_elements("css selector", row),
                 10, what=f"the old job alone, filtered by {field}")
        box.clear()
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)
        wait_for(lambda: "showing 1000 " in text(browser, "#job-counts"), 10, what="the filter cleared")
    assert not browser.find_element("id", "error").is_displayed(), text(browser, "#error")


def test_a_console_file_missing_from_the_install_is_a_503_that_says_to_reinstall(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from pond.errors import Unavailable
    monkeypatch.setattr(console, "UI_DIR", tmp_path)         # an install without pond/ui/
    with pytest.raises(Unavailable) as refused:
        console.static(None, SimpleNamespace(params={"name": "/"}, path="/ui/"))
    assert "index.html" in refused.value.message and "reinstall pond" in refused.value.hint
