"""Artifact storage behind fsspec: a local directory by default, any fsspec URL (s3://…) in production.

``s3://bucket/prefix`` goes through s3fs (the ``s3`` extra) and is configured only by the standard
AWS environment, as boto itself reads it, so the same variables serve every S3-compatible server:

- endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (unset: AWS itself);
- credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), or
  anything else in boto's chain (profile, instance role, IRSA);
- region: ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``).

The bucket must exist (the store never creates one). Every method behaves the same on ``file://``
and ``s3://``: sorted keys, a missing key is ``FileNotFoundError``, a prefix covers the keys under
``prefix/`` only (never ``prefix-other/...``). Listings are never cached, because another process
(a second trainer, the dataset-builder) writes to the same bucket and a stale listing would hide
its checkpoints.

Keys are built by the services from ids, never from user strings, and are checked here again:
every segment is a plain name (letters, digits, '.', '_', '-', not starting with a dot), so no
key can hold '..', an absolute or drive path, a backslash, a percent escape, NUL or a newline.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" would let "x\n" through
MAX_KEY = 1024


class StorageKeyError(ValueError):
    pass


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise StorageKeyError(f"invalid artifact key {str(key)[:80]!r}")
    parts = key.split("/")
    if any(not _SEGMENT.fullmatch(p) or p in (".", "..") for p in parts):
        raise StorageKeyError(f"invalid artifact key {key[:200]!r}")
    return key


def artifact_key(*segments: str) -> str:
    """A key from server-made parts (ids, fixed names); each part must be one segment, so a part
    that smuggles a '/' or '..' is refused instead of joined."""
    for segment in segments:
        if "/" in segment or not _SEGMENT.fullmatch(segment):
            raise StorageKeyError(f"invalid artifact key segment {segment[:80]!r}")
    return "/".join(segments)


# Read-ahead of a remote download stream: a bounded buffer however large the file (s3fs'
# default block is 50 MiB per open file), few enough requests for a multi-GB adapter.
REMOTE_READ_BLOCK = 8 * 1024 * 1024


def remote_options(protocol: str) -> dict:
    """fsspec options for a remote store: no listing cache, no instance shared with other stores
    (each would keep the endpoint of the environment it was made in), and for S3 the endpoint
    from the standard variables, passed explicitly so it does not depend on the boto version."""
    options: dict = {"use_listings_cache": False, "skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    return options


class ArtifactStore:
    """Bytes under keys (``a/b/c``), in one directory or one bucket prefix; see the module text."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        options = {} if protocol in ("file", "local") else remote_options(protocol)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:  # s3fs (or another backend) not installed: say what brings it
            hint = "pip install 'tuneforge[s3]'" if protocol in ("s3", "s3a") else "install its fsspec backend"
            raise RuntimeError(f"artifact store {self.url!r} needs a package that is missing ({hint}): {exc}") from exc
        self.root = self.root.rstrip("/")
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.is_local = "file" in protocols
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: a reader sees the old object or the new one, never part of it (a
        local temp file renamed over; an S3 PUT is atomic by itself)."""
        path = self._path(key)
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:  # no directories on S3 (s3fs' makedirs would only probe, or create, the bucket)
            self.fs.pipe_file(path, data)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return self.fs.cat_file(path)
        except IsADirectoryError as exc:  # a prefix, not a key: as S3 answers
            raise FileNotFoundError(path) from exc

    def put_file(self, local: Path, key: str) -> None:
        path = self._path(key)
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            shutil.copyfile(local, tmp)
            os.replace(tmp, path)
        else:  # s3fs streams it (multipart above its block size), never whole in memory
            self.fs.put_file(str(local), path)

    def put_dir(self, local_dir: Path, prefix: str) -> list[str]:
        """Every file under ``local_dir`` (recursively) as ``prefix/<relative path>``, in sorted order."""
        keys = []
        for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            key = f"{check_key(prefix)}/{file.relative_to(local_dir).as_posix()}"
            self.put_file(file, key)
            keys.append(key)
        return keys

    def _find(self, prefix: str) -> list[str]:
        """Paths of the objects strictly under ``prefix/`` (fsspec's find also returns ``prefix``
        itself when it is a file, and a missing prefix is an empty list on both backends)."""
        base = self._path(prefix)
        return [p for p in self.fs.find(base) if p.startswith(base + "/")]

    def list(self, prefix: str) -> list[str]:
        """The keys under ``prefix/``, sorted; ``[]`` when there are none."""
        base = self._path(prefix)
        return sorted(f"{prefix}/{p[len(base) + 1:]}" for p in self._find(prefix))

    def get_dir(self, prefix: str, local_dir: Path) -> Path:
        local_dir.mkdir(parents=True, exist_ok=True)
        for key in self.list(prefix):
            target = local_dir / key[len(prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(key), str(target))
        return local_dir

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object block by block; a remote one through a bounded read-ahead buffer."""
        path = self._path(key)
        options = {} if self.is_local else {"block_size": max(chunk_size, REMOTE_READ_BLOCK)}
        try:
            fh = self.fs.open(path, "rb", **options)
        except IsADirectoryError as exc:
            raise FileNotFoundError(path) from exc
        with fh:
            if getattr(fh, "details", {}).get("type", "file") != "file":  # s3fs opens a prefix as empty
                raise FileNotFoundError(path)
            while block := fh.read(chunk_size):
                yield block

    def copy(self, key: str, dest: str) -> None:
        """Copy one object to another key inside the store without passing it through this
        process: a server-side CopyObject on S3, a file copy (temp file renamed over) on disk."""
        source, target = self._path(key), self._path(dest)
        if self.is_local:
            if not os.path.isfile(source):
                raise FileNotFoundError(source)
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        else:
            self.fs.copy(source, target)

    def digest(self, key: str) -> tuple[int, str]:
        """``(size in bytes, sha256 hex)`` of an object, read block by block (never whole in memory)."""
        sha, size = hashlib.sha256(), 0
        for block in self.iter_chunks(key, 8 << 20):
            sha.update(block)
            size += len(block)
        return size, sha.hexdigest()

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix/`` (no error when there is none)."""
        base = self._path(prefix)
        if self.is_local:
            if self.fs.isdir(base):
                self.fs.rm(base, recursive=True)
        else:
            paths = self._find(prefix)
            if paths:
                self.fs.rm(paths)  # batched DeleteObjects
