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


class JsonFormatter(logging.Formatter):
    def __init__(self, process):
        super().__init__()
        self.process = process

    def format(self, record):
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if log_format == "json" else
                         logging.Formatter(f"%(asctime)s {process} %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
