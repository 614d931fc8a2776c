"""Blob stores: a bundle's ciphertext and a job's artifacts, by key, written in order, read in pieces.

    FileBlobs  files under DIR/blobs (pond on SQLite, the default)
    PgBlobs    rows of the `blobs` table (pond on PostgreSQL: every replica reads what any one wrote)

Keys are slash-separated names made by pond (bundles/b_..., artifacts/j_.../1/...), never by a
client. A store has five verbs: append (at the end only), size, read (a bounded piece), delete
and, shared, sha256 (piece by piece): neither holds a whole blob in memory. pond picks the one
that matches its store (for_store). An S3-compatible store would be a third with the same verbs.

collect() is the reaper's garbage collection (specs/bundles.md §9): bundles no live job needs,
and artifacts of jobs that ended, once their retention period has passed.
"""

import hashlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("pond")
PIECE = 1024 * 1024          # bytes read at a time for a digest
COLLECT_BATCH = 200          # bundles or artifacts deleted in one reaper pass, at most
COLLECT_EVERY = 60.0         # s between two collections, unless a retention is shorter


class FileBlobs:
    """Blobs as files under one directory (0700; files 0600)."""

    def __init__(self, root):
        self.root = Path(root)

    def _path(self, key):
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad blob key {key!r}")
        return self.root.joinpath(*parts)

    def append(self, key, offset, data):
        """Write `data` at `offset`, which must be the blob's size now -> the new size."""
        path = self._path(key)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if os.fstat(fd).st_size != offset:
                raise ValueError("offset is not the end of the blob")
            os.write(fd, data)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def size(self, key):
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, key, offset, n):
        """At most `n` bytes from `offset`; b"" past the end or for a blob that is not there."""
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read(n)
        except FileNotFoundError:
            return b""

    def delete(self, key):
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return
        parent = self._path(key).parent          # an artifact's empty directories go too
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


class PgBlobs:
    """Blobs as rows of at most store_pg.BLOB_ROW bytes in PostgreSQL (store_pg.PgStore's blob_*)."""

    def __init__(self, store):
        self.store = store

    def append(self, key, offset, data):
        return self.store.blob_append(key, offset, data)

    def size(self, key):
        return self.store.blob_size(key)

    def read(self, key, offset, n):
        return self.store.blob_read(key, offset, n)

    def delete(self, key):
        self.store.blob_delete(key)


def for_store(pond):
    """The blob store of pond's store: PostgreSQL's table when it runs on one, else the state dir."""
    if hasattr(pond.store, "blob_append"):
        return PgBlobs(pond.store)
    return FileBlobs(Path(pond.settings.state_dir) / "blobs")


def sha256(blobs, key):
    """The blob's SHA-256 hex, read a piece at a time."""
    digest, offset = hashlib.sha256(), 0
    while block := blobs.read(key, offset, PIECE):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


# -- garbage collection (the reaper's; specs/bundles.md §9) --------------------------------------

def collect_if_due(pond):
    """The reaper's call: collect() every COLLECT_EVERY s, or every half of a shorter retention."""
    s, now = pond.settings, time.monotonic()
    if pond.collected_at is None or now - pond.collected_at >= min(COLLECT_EVERY, s.bundle_retention / 2,
                                                                   s.artifact_retention / 2):
        pond.collected_at = now
        collect(pond)


def collect(pond):
    """Delete what is past its retention -> (bundles, artifacts) deleted. A blob goes before its row:
    a pass cut short leaves a row whose blob is gone, which the next pass deletes again."""
    now, s = pond.now(), pond.settings
    blobs, bundles, artifacts = for_store(pond), 0, 0
    for bundle_id in pond.store.bundles_to_collect(now - s.bundle_retention, COLLECT_BATCH):
        blobs.delete(f"bundles/{bundle_id}")
        pond.store.delete_bundle(bundle_id)
        bundles += 1
    for row in pond.store.artifacts_to_collect(now - s.artifact_retention, COLLECT_BATCH):
        blobs.delete(f"artifacts/{row['job_id']}/{row['attempt']}/{row['name']}")
        pond.store.delete_artifact(row["job_id"], row["attempt"], row["name"])
        artifacts += 1
    if bundles or artifacts:
        pond.metrics.collected.add("bundle", bundles)
        pond.metrics.collected.add("artifact", artifacts)
        log.info("collected %d bundles and %d artifacts past their retention (%g s, %g s)", bundles, artifacts,
                 s.bundle_retention, s.artifact_retention,
                 extra={"event": "collected", "bundles": bundles, "artifacts": artifacts})
    return bundles, artifacts
