"""Artifact storage behind fsspec: a local directory by default, any fsspec URL (s3://…) in production.

Keys are built by the services from ids, never from user strings, and are checked here again:
every segment is a plain name (letters, digits, '.', '_', '-', not starting with a dot), so no
key can hold '..', an absolute or drive path, a backslash, a percent escape, NUL or a newline.
"""

from __future__ import annotations

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




class ArtifactStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in (self.fs.protocol or ())
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"


    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def get_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))


    def put_file(self, local: Path, key: str) -> None:
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            tmp = f"{path}.tmp-{os.getpid()}"
            shutil.copyfile(local, tmp)
            os.replace(tmp, path)
        else:
            self.fs.put_file(str(local), path)

    def put_dir(self, local_dir: Path, prefix: str) -> list[str]:
        keys = []
        for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            key = f"{check_key(prefix)}/{file.relative_to(local_dir).as_posix()}"
            self.put_file(file, key)
            keys.append(key)
        return keys

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        return sorted(f"{prefix}/{p[len(base) + 1:]}" for p in found)

    def get_dir(self, prefix: str, local_dir: Path) -> Path:
        local_dir.mkdir(parents=True, exist_ok=True)
        for key in self.list(prefix):
            target = local_dir / key[len(prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(key), str(target))
        return local_dir

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self.fs.open(self._path(key), "rb") as fh:
            while block := fh.read(chunk_size):
                yield block



    def delete_prefix(self, prefix: str) -> None:
        base = self._path(prefix)
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)

