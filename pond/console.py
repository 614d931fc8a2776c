"""The web console: pond serves the files of pond/ui/ at /ui/ (specs/protocol.md §9).

The files are plain HTML, CSS and JavaScript shipped in the package, with no build step. They
hold no data and need no auth: the page asks the operator for the admin token, keeps it in the
tab's sessionStorage, and calls the JSON API with it. Every answer here carries HEADERS: no
script, style or connection but pond's own, no frame around the page, no caching.
"""

from dataclasses import dataclass
from pathlib import Path

from pond.errors import NotFound, Unavailable

UI_DIR = Path(__file__).with_name("ui")
# The path after /ui -> the file. A lookup, never a path join: nothing else under pond/ is served.
FILES = {"": "index.html", "/": "index.html", "/index.html": "index.html", "/console.js": "console.js",
         "/console.css": "console.css"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
HEADERS = (f"Content-Security-Policy: {CSP}\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n"
           "Cross-Origin-Opener-Policy: same-origin\r\n")


@dataclass(frozen=True)
class File:
    """A static answer: the server writes it with HEADERS instead of as JSON."""

    body: bytes
    content_type: str


def static(pond, req):
    """GET /ui/ and its files (no auth: they hold no data)."""
    name = FILES.get(req.params["name"] or "")
    if name is None:
        raise NotFound(f"the console has no file {req.path[:100]}", "open /ui/")
    try:
        body = (UI_DIR / name).read_bytes()
    except OSError as e:
        raise Unavailable(f"the console's file {name} cannot be read: {e.strerror}",
                          "reinstall pond (pip install pond-swarm): pond/ui/ ships in its package") from None
    return 200, File(body, TYPES[Path(name).suffix])
