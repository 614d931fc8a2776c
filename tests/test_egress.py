"""The egress proxy of a job (swarm.py "Job proxies"): real sockets, loopback only.

Allowed requests reach an upstream on 127.0.0.1 through the policy's loopback switch; nothing here
ever connects anywhere else (refusals happen before any connect, and IP literals need no DNS).
"""

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import swarm
from conftest import free_port, wait_for

TIMEOUT = 5.0


class Echo(BaseHTTPRequestHandler):
    """Answers with the request line and headers it received, one per line."""

    def do_GET(self):
        self.server.seen.append((self.requestline, dict(self.headers.items())))
        body = "\n".join([self.requestline] + [f"{k}: {v}" for k, v in self.headers.items()]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


@pytest.fixture
def proxies():
    """start(policy, ...) -> (proxy, its address, the decisions it logged); every proxy closed afterwards."""
    started = []

    def start(policy, max_connections=32, log_line=None):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        lines = []
        proxy = swarm.EgressProxy(listener, policy, log_line or lines.append, max_connections)
        proxy.start()
        started.append(proxy)
        return proxy, listener.getsockname(), lines

    yield start
    for proxy in started:
        proxy.close()
    assert not [t for t in threading.enumerate() if t.name in ("egress-accept", "egress-connection")]


def loopback_policy(port, **fields):
    return swarm.EgressPolicy(**{"allow": ("localhost",), "ports": (port,), "loopback": "127.0.0.1", **fields})


def read_all(sock):
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def ask(address, raw):
    """Send one raw request to the proxy; -> (status, the rest of the answer as text)."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(raw)
        answer = read_all(sock).decode("latin-1")
    status_line, _, rest = answer.partition("\r\n")
    return int(status_line.split()[1]), rest


def tunnel(address, target):
    """A socket through which CONNECT `target` was established."""
    sock = socket.create_connection(address, timeout=TIMEOUT)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200 Connection Established\r\n"), head
    return sock


def decision(host, port, verdict, reason, address=None):
    return {"host": host, "port": port, "verdict": verdict, "reason": reason, "address": address}


# -- allowed traffic -------------------------------------------------------------------------------


def test_connect_to_an_allowed_host_opens_an_opaque_tunnel(upstream, proxies):
    port = upstream.server_address[1]
    _, address, lines = proxies(loopback_policy(port))
    with tunnel(address, f"localhost:{port}") as sock:
        sock.sendall(b"GET /through HTTP/1.0\r\n\r\n")
        answer = read_all(sock).decode()
    assert answer.startswith("HTTP/1.0 200") and "GET /through HTTP/1.0" in answer
    assert lines == [decision("localhost", port, "allow", "allowed", "127.0.0.1")]


def test_absolute_uri_http_is_sent_in_origin_form_without_proxy_credentials(upstream, proxies):
    port = upstream.server_address[1]
    _, address, lines = proxies(loopback_policy(port))
    status, _ = ask(address, (f"GET http://localhost:{port}/path?q=1 HTTP/1.1\r\nHost: elsewhere\r\n"
                              "Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n"
                              "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Kept: 2\r\n\r\n").encode())
    assert status == 200
    [(request_line, headers)] = upstream.seen
    assert request_line == "GET /path?q=1 HTTP/1.1"
    assert headers == {"Host": f"localhost:{port}", "X-Kept": "2", "Connection": "close"}
    assert lines == [decision("localhost", port, "allow", "allowed", "127.0.0.1")]


def test_a_request_body_is_relayed_as_framed(upstream, proxies):
    port = upstream.server_address[1]
    _, address, _ = proxies(loopback_policy(port))
    status, rest = ask(address, f"POST http://localhost:{port}/up HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".encode())
    assert status == 200 and rest.endswith("\r\n\r\nhello")


def test_an_allowed_ip_literal_passes_only_as_the_loopback_switch_address(upstream, proxies):
    port = upstream.server_address[1]
    _, address, lines = proxies(loopback_policy(port, allow=("127.0.0.1", "::ffff:127.0.0.1")))
    tunnel(address, f"127.0.0.1:{port}").close()
    assert ask(address, f"CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\n\r\n".encode())[0] == 403
    assert [line["reason"] for line in lines] == ["allowed", "address-not-global"]


def test_an_upstream_that_refuses_is_a_502_allowed_by_policy(proxies):
    closed = free_port()
    _, address, lines = proxies(loopback_policy(closed))
    status, text = ask(address, f"CONNECT localhost:{closed} HTTP/1.1\r\n\r\n".encode())
    assert status == 502 and "refused the connection" in text
    assert lines == [decision("localhost", closed, "allow", "connect-failed", "127.0.0.1")]


# -- refusals by name and port ----------------------------------------------------------------------


def test_a_host_not_on_the_list_is_refused_with_a_reason(proxies):
    _, address, lines = proxies(swarm.EgressPolicy())
    status, text = ask(address, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    assert status == 403 and text.endswith("add it to sandbox.allow_hosts\n")
    assert lines == [decision("example.com", 443, "deny", "host-not-allowed")]


def test_deny_wins_over_allow(proxies):
    _, address, lines = proxies(swarm.EgressPolicy(allow=("*.example.org",), deny=("bad.example.org",)))
    assert ask(address, b"GET http://bad.example.org/ HTTP/1.1\r\n\r\n")[0] == 403
    assert lines == [decision("bad.example.org", 80, "deny", "host-denied")]


def test_suffix_patterns_match_subdomains_only():
    policy = swarm.EgressPolicy(allow=("*.example.org",))
    assert policy.refusal("a.example.org", 443) is None
    assert policy.refusal("deep.a.example.org", 443) is None
    assert policy.refusal("example.org", 443) == "host-not-allowed"
    assert policy.refusal("evilexample.org", 443) == "host-not-allowed"
    assert policy.refusal("a.example.org.evil.com", 443) == "host-not-allowed"


def test_a_port_not_allowed_is_refused(upstream, proxies):
    port = upstream.server_address[1]
    _, address, lines = proxies(swarm.EgressPolicy(allow=("localhost",), loopback="127.0.0.1"))
    assert ask(address, f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())[0] == 403
    assert lines == [decision("localhost", port, "deny", "port-not-allowed")]
    assert not upstream.seen


LITERALS = ["169.254.169.254", "127.0.0.1", "10.0.0.1", "[::1]", "[::ffff:127.0.0.1]"]


@pytest.mark.parametrize("literal", LITERALS)
def test_ip_literals_are_refused_unless_allowed_and_global(proxies, literal):
    host = literal.strip("[]")
    _, address, lines = proxies(swarm.EgressPolicy())
    assert ask(address, f"CONNECT {literal}:443 HTTP/1.1\r\n\r\n".encode())[0] == 403
    _, address, more = proxies(swarm.EgressPolicy(allow=tuple(h.strip("[]") for h in LITERALS)))
    assert ask(address, f"GET http://{literal}/ HTTP/1.1\r\n\r\n".encode())[0] == 403
    assert lines == [decision(host, 443, "deny", "ip-literal-not-allowed")]
    assert more == [decision(host, 80, "deny", "port-not-allowed")]
    _, address, vetted = proxies(swarm.EgressPolicy(allow=tuple(h.strip("[]") for h in LITERALS)))
    assert ask(address, f"CONNECT {literal}:443 HTTP/1.1\r\n\r\n".encode())[0] == 403
    assert vetted == [decision(host, 443, "deny", "address-not-global")]


def test_a_name_resolving_to_a_non_global_address_is_refused_after_dns(upstream, proxies):
    port = upstream.server_address[1]
    _, address, lines = proxies(swarm.EgressPolicy(allow=("localhost",), ports=(port,)))
    status, text = ask(address, f"GET http://localhost:{port}/ HTTP/1.1\r\n\r\n".encode())
    assert status == 403 and "not on the public internet" in text
    assert lines == [decision("localhost", port, "deny", "address-not-global")]
    assert not upstream.seen


# -- the address classifier and the policy -----------------------------------------------------------

NOT_GLOBAL = ["127.0.0.1", "127.1.2.3", "::1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "fc00::1", "fd12::1",
              "169.254.169.254", "fe80::1", "fd00:ec2::254", "100.64.0.1", "100.127.255.254", "224.0.0.1",
              "ff02::1", "240.0.0.1", "255.255.255.255", "0.0.0.0", "::", "0.1.2.3", "64:ff9b::a00:1",
              "64:ff9b::808:808", "192.0.0.9", "192.0.0.170", "198.18.0.1", "198.19.255.1", "2001:db8::1",
              "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:a00:1::1", "192.0.2.1"]
GLOBAL = ["8.8.8.8", "1.1.1.1", "151.101.0.223", "2606:4700::1", "2a04:4e42::223", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", NOT_GLOBAL)
def test_the_classifier_refuses_every_non_global_range(address):
    assert not swarm.is_global_address(address)
    assert swarm.EgressPolicy().vet([address]) == ("address-not-global", None)


@pytest.mark.parametrize("address", GLOBAL)
def test_the_classifier_allows_global_addresses(address):
    assert swarm.is_global_address(address)
    assert swarm.EgressPolicy().vet([address]) == (None, [address])


def test_one_non_global_answer_refuses_the_whole_name():
    assert swarm.EgressPolicy().vet(["8.8.8.8", "10.0.0.1"]) == ("address-not-global", None)


def test_the_loopback_switch_lets_exactly_its_address_through():
    policy = swarm.EgressPolicy(loopback="127.0.0.1")
    assert policy.vet(["127.0.0.1"]) == (None, ["127.0.0.1"])
    assert policy.vet(["127.0.0.1", "::1"]) == (None, ["127.0.0.1"])     # localhost's ::1 is not dialled
    assert policy.vet(["127.0.0.2"]) == ("address-not-global", None)
    assert policy.vet(["127.0.0.1", "10.0.0.1"]) == ("address-not-global", None)
    assert policy.vet(["::ffff:127.0.0.1"]) == ("address-not-global", None)


@pytest.mark.parametrize("value", ["10.0.0.1", "0.0.0.0", "8.8.8.8", "::ffff:127.0.0.1", "localhost", "",
                                   "127.0.0.0/8"])
def test_the_loopback_switch_refuses_anything_but_a_loopback_address(value):
    with pytest.raises(ValueError, match="loopback address"):
        swarm.EgressPolicy(loopback=value)


def test_with_hosts_adds_a_jobs_hosts_and_keeps_the_rest():
    policy = swarm.EgressPolicy(deny=("x.example.net",), ports=(443, 80), loopback="::1")
    job = policy.with_hosts(["example.org", "*.example.net", "pypi.org"])
    assert job.allow == swarm.DEFAULT_EGRESS_HOSTS + ("example.org", "*.example.net")
    assert (job.deny, job.ports, job.loopback) == (policy.deny, policy.ports, policy.loopback)
    assert job.refusal("x.example.net", 443) == "host-denied" and job.refusal("y.example.net", 80) is None


# -- bad requests and limits -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"NONSENSE\r\n\r\n", b"CONNECT localhost HTTP/1.1\r\n\r\n",
                                 b"GET https://pypi.org/ HTTP/1.1\r\n\r\n", b"GET /relative HTTP/1.1\r\n\r\n",
                                 b"CONNECT user@pypi.org:443 HTTP/1.1\r\n\r\n",
                                 b"GET http://pypi.org/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
                                 b"GET http://pypi.org/ HTTP/1.1\r\nX: a\nProxy-Authorization: b\r\n\r\n",
                                 b"G\x00T http://pypi.org/ HTTP/1.1\r\n\r\n",
                                 b"CONNECT pypi_org!:443 HTTP/1.1\r\n\r\n"])
def test_a_malformed_request_is_a_400(proxies, raw):
    _, address, lines = proxies(swarm.EgressPolicy())
    assert ask(address, raw)[0] == 400
    assert [(line["verdict"], line["reason"]) for line in lines] == [("deny", "bad-request")]


def test_a_request_head_over_the_cap_is_refused(proxies):
    _, address, lines = proxies(swarm.EgressPolicy())
    raw = b"GET http://pypi.org/ HTTP/1.1\r\nX-Big: " + b"a" * swarm.EGRESS_HEAD_MAX
    assert ask(address, raw[:swarm.EGRESS_HEAD_MAX + 1])[0] == 431
    assert lines == [decision(None, None, "deny", "head-too-large")]


def test_a_slow_request_head_times_out(proxies, monkeypatch):
    monkeypatch.setattr(swarm, "EGRESS_HEAD_TIMEOUT", 0.3)
    _, address, lines = proxies(swarm.EgressPolicy())
    assert ask(address, b"CONNECT pypi.org:443 HTTP/1.1\r\n")[0] == 408
    assert lines == [decision(None, None, "deny", "head-timeout")]


def test_connections_over_the_cap_are_refused_until_one_closes(upstream, proxies):
    port = upstream.server_address[1]
    _, address, lines = proxies(loopback_policy(port), max_connections=2)
    first, second = tunnel(address, f"localhost:{port}"), tunnel(address, f"localhost:{port}")
    status, text = ask(address, f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
    assert status == 503 and "too many connections" in text
    assert lines[-1] == decision(None, None, "deny", "over-connection-cap")
    first.close()
    wait_for(lambda: ask(address, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")[0] == 403, TIMEOUT,
             what="a connection slot to come free")
    second.close()


def test_an_idle_tunnel_is_closed(upstream, proxies, monkeypatch):
    monkeypatch.setattr(swarm, "EGRESS_IDLE_TIMEOUT", 0.3)
    port = upstream.server_address[1]
    _, address, _ = proxies(loopback_policy(port))
    with tunnel(address, f"localhost:{port}") as sock:
        assert sock.recv(1) == b""          # the proxy ended it, well inside the socket's own timeout


# -- lifecycle and logging ----------------------------------------------------------------------------


def test_close_ends_an_open_tunnel_and_leaves_no_thread(upstream, proxies):
    port = upstream.server_address[1]
    proxy, address, _ = proxies(loopback_policy(port))
    with tunnel(address, f"localhost:{port}") as sock:
        proxy.close()
        assert sock.recv(1) == b""
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("egress")], TIMEOUT,
             what="the proxy's threads to end")
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=TIMEOUT).close()


def test_each_request_gets_exactly_one_decision(upstream, proxies):
    port = upstream.server_address[1]
    _, address, lines = proxies(loopback_policy(port))
    ask(address, f"GET http://localhost:{port}/ HTTP/1.1\r\n\r\n".encode())
    ask(address, b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
    ask(address, b"GET http://localhost:443/ HTTP/1.1\r\n\r\n")
    ask(address, b"NONSENSE\r\n\r\n")
    assert [(line["verdict"], line["reason"]) for line in lines] == [
        ("allow", "allowed"), ("deny", "host-not-allowed"), ("deny", "port-not-allowed"), ("deny", "bad-request")]
    assert all(set(line) == {"host", "port", "verdict", "reason", "address"} for line in lines)


def test_a_failing_handler_closes_its_connection_logs_it_and_the_proxy_goes_on(proxies, caplog):
    calls = []

    def log_line(line):
        calls.append(line)
        if len(calls) == 1:
            raise RuntimeError("the job's log is gone")

    _, address, _ = proxies(swarm.EgressPolicy(), log_line=log_line)
    with caplog.at_level(logging.ERROR, logger="swarm"):
        with socket.create_connection(address, timeout=TIMEOUT) as sock:
            sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            assert read_all(sock) == b""
        wait_for(lambda: any("connection failed" in r.getMessage() and r.exc_info for r in caplog.records), TIMEOUT,
                 what="the handler's failure in the log")
    assert ask(address, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")[0] == 403
    assert len(calls) == 2
