"""Worker public keys as pond sees them, and their fingerprint (specs/keys.md).

pond never holds a worker's private keys. It will pin a worker's two public keys at
enrollment (issue 3) and name them to operators by this fingerprint.
"""

import hashlib

KEY_BYTES = 32
FINGERPRINT_CONTEXT = b"pond-worker-key-v1\x00"


def fingerprint(x25519_public, ed25519_public):
    """Lowercase hex SHA-256 over a context string and both raw public keys (specs/keys.md §3)."""
    if len(x25519_public) != KEY_BYTES or len(ed25519_public) != KEY_BYTES:
        raise ValueError("a worker public key is 32 raw bytes")
    return hashlib.sha256(FINGERPRINT_CONTEXT + bytes(x25519_public) + bytes(ed25519_public)).hexdigest()
