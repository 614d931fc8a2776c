"""TLS transport: pond and the orchestrator serve HTTPS, every client verifies, plain HTTP
off loopback is refused unless the operator says --insecure-no-tls."""

import datetime
import ipaddress
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import JOB_PY, SWARM, Proc, run


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_pem(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("pond test CA")).issuer_name(_name("pond test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server-key.pem"}
    _write_pem(paths["ca"], cert=ca)
    _write_pem(paths["cert"], cert=cert)
    _write_pem(paths["key"], key=key)
    return paths


def _tls(certs):
    return ("--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"]))


def test_a_job_runs_end_to_end_over_tls(pool, certs):
    ca = str(certs["ca"])
    pond = pool.pond(extra=_tls(certs), ca_file=ca)
    assert pond.url.startswith("https://127.0.0.1:")
    assert '"url": "https://' in (pond.state_dir / "endpoint.json").read_text()
    orch = pool.orchestrator(pond, extra=(*_tls(certs), "--ca-file", ca))       # pair and serve --ca-file
    assert orch.url().startswith("https://127.0.0.1:")
    assert '"url": "https://' in (orch.state_dir / "serve.json").read_text()
    assert '"pond_url": "https://' in (orch.state_dir / "backend-handle.json").read_text()
    pool.worker(pond, orch, tags="pool:trusted", capabilities="harness.*,sandbox.*", extra=("--ca-file", ca))
    done = pond.cli("submit", "--wait", "--profile", "none", "--", JOB_PY, "-c", "print('over tls')")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "over tls\n"
    status = run([sys.executable, SWARM, "status", "--orchestrator", orch.url(), "--ca-file", ca,
                  "--token-file", str(orch.token_file), "--json"])
    assert status.returncode == 0, status.stderr
    assert '"pond_reachable": true' in status.stdout


def test_a_client_without_the_ca_file_is_refused_with_a_hint(pool, certs):
    pond = pool.pond(extra=_tls(certs), ca_file=str(certs["ca"]))
    orch = pool.orchestrator(pond, extra=(*_tls(certs), "--ca-file", str(certs["ca"])))
    jobs = run([sys.executable, "-m", "pond", "--state-dir", str(pond.state_dir), "jobs"])
    assert jobs.returncode == 3, jobs.stderr
    assert "cannot reach pond" in jobs.stderr and "--ca-file" in jobs.stderr
    pair = run([sys.executable, SWARM, "pair", "--pond", pond.url, "--code", pond.pairing_code(),
                "--out", str(pool.tmp / "handle.json")])
    assert pair.returncode == 3, pair.stderr
    assert "--ca-file" in pair.stderr
    status = run([sys.executable, SWARM, "status", "--orchestrator", orch.url(),
                  "--token-file", str(orch.token_file)])
    assert status.returncode == 3, status.stderr
    assert "cannot reach the orchestrator" in status.stderr and "--ca-file" in status.stderr
    plain = run([sys.executable, "-m", "pond", "--state-dir", str(pond.state_dir), "--retry-for", "0",
                 "--pond", pond.url.replace("https://", "http://"), "jobs"])
    assert plain.returncode == 3, plain.stderr        # no silent fallback: plain HTTP to a TLS port fails
    assert pond.proc.alive() and orch.alive()


def test_pond_refuses_plain_http_off_loopback_unless_told(pool, tmp_path):
    token = tmp_path / "admin-token-file"
    token.write_text("pond_admin_test\n")
    token.chmod(0o600)
    argv = [sys.executable, "-m", "pond", "serve", "--bind", "0.0.0.0:0", "--state-dir", str(tmp_path / "p"),
            "--admin-token-file", str(token)]
    refused = run(argv)
    assert refused.returncode == 2, refused.stderr
    assert "--tls-cert" in refused.stderr and "--insecure-no-tls" in refused.stderr
    no_token = run([sys.executable, "-m", "pond", "serve", "--bind", "0.0.0.0:0", "--state-dir",
                    str(tmp_path / "q"), "--insecure-no-tls"])
    assert no_token.returncode == 2 and "admin token" in no_token.stderr
    proc = Proc(argv + ["--insecure-no-tls"], tmp_path / "pond.log", env=pool.pond_env(tmp_path / "p"))
    try:
        assert proc.ready().startswith("pond listening on http://0.0.0.0:")
    finally:
        assert proc.stop() == 0


def test_swarm_serve_refuses_plain_http_off_loopback_unless_told(pool, tmp_path):
    pond = pool.pond()
    handle = tmp_path / "handle.json"
    done = run([sys.executable, SWARM, "pair", "--pond", pond.url, "--code", pond.pairing_code(), "--out", str(handle)])
    assert done.returncode == 0, done.stderr
    argv = [sys.executable, SWARM, "serve", "--bind", "0.0.0.0:0", "--state-dir", str(tmp_path / "s"),
            "--handle", str(handle), "--token", "pool-secret"]
    refused = run(argv)
    assert refused.returncode == 2, refused.stderr
    assert "--tls-cert" in refused.stderr and "--insecure-no-tls" in refused.stderr
    proc = Proc(argv + ["--insecure-no-tls"], tmp_path / "orch.log")
    try:
        assert proc.ready().startswith("swarm serve listening on http://0.0.0.0:")
    finally:
        proc.stop()


def test_a_tls_cert_without_its_key_is_refused(tmp_path, certs):
    done = run([sys.executable, "-m", "pond", "serve", "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path / "p"),
                "--tls-cert", str(certs["cert"])])
    assert done.returncode == 2 and "--tls-key" in done.stderr
    done = run([sys.executable, SWARM, "serve", "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"),
                "--tls-key", str(certs["key"]), "--token", "x"])
    assert done.returncode == 2 and "--tls-cert" in done.stderr
