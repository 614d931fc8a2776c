"""pond's log lines on stderr: text for people (the default), or one JSON object a line for machines.

`pond serve --log-format json` (or POND_LOG_FORMAT=json) writes each line as
{"time", "level", "process", "pid", "message", ...fields}: `time` is ISO 8601 UTC (`2026-11-26T07:55:27.747Z`), `level`
lower case, and a line about a job carries its fields as keys (`job`, `event`, `attempt`,
`worker`, `state`, `exit_code`), given by the call site as `extra=`. Codes and tokens are
taken out of every string (tokens.redact), as the text lines' call sites do, so that a field
cannot carry what a message would not. swarm.py's "Utilities" write the same shape.
"""

import json
import logging
import sys
import time

from pond.tokens import redact

FORMATS = ("text", "json")
FIELDS = ("job", "event", "attempt", "worker", "orchestrator", "state", "exit_code")   # extra= keys a line may carry


class TextFormatter(logging.Formatter):
    """`TIME process LEVEL message`; the time's text is made once a second, not once a line
    (at hundreds of jobs a second, strftime was a third of a line's cost)."""

    def __init__(self, fmt, utc=False):
        super().__init__(fmt)
        self._second, self._text, self._utc = None, "", utc

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S" if self._utc else "%Y-%m-%d %H:%M:%S",
                                       (time.gmtime if self._utc else time.localtime)(second))
            self._second = second
        return f"{self._text}{'.' if self._utc else ','}{int(record.msecs):03d}"


class JsonFormatter(TextFormatter):
    def __init__(self, process):
        super().__init__(None, utc=True)
        self.process = process

    def format(self, record):
        line = {"time": self.formatTime(record) + "Z",
                "level": record.levelname.lower(), "process": self.process, "pid": record.process,
                "message": redact(record.getMessage())}
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


def setup(log_format, process="pond"):
    """Send the root logger's INFO and above to stderr in `log_format` (one of FORMATS)."""
    logging.logThreads = logging.logMultiprocessing = False    # no line shows them; each costs a lookup a line
    logging._srcfile = None      # nor the caller's file and line: the logging module's own switch to skip the stack walk
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if log_format == "json" else
                         TextFormatter(f"%(asctime)s {process} %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
