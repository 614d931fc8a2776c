"""TLS contexts (stdlib ssl): servers present a certificate, clients verify it by default.

Verification is never turned off here: a certificate that does not verify is an error
for the caller to report, never a reason to fall back to plain HTTP.
"""

import ssl

from pond.errors import ConfigError


def server_context(cert_file, key_file):
    """A server-side context for --tls-cert/--tls-key (TLS 1.2 or newer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS certificate {cert_file} / key {key_file}: {e}",
                          "--tls-cert is a PEM certificate (chain), --tls-key its PEM private key") from None
    return ctx


def client_context(ca_file=None):
    """A verifying client context: the CA in `ca_file`, else the system trust store; host names checked."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the CA file {ca_file}: {e}",
                          "--ca-file is a PEM file with the certificate of the CA that signed the server's") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
