"""The artifact store's contract, the same tests on ``file://`` and on ``s3://`` (s3fs against moto's
S3 server: real HTTP on loopback), plus the store's real users on S3: the trainer's checkpoint
upload/resume helpers, the chunked download code, and a dataset snapshot built by the real
dataset-builder and downloaded through DownloadDataset with ``TUNEFORGE_ARTIFACT_URL=s3://…``."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import workspace
from tuneforge import sdk
from tuneforge.core.rpc import file_chunks
from tuneforge.core.storage import ArtifactStore, StorageKeyError, remote_options

REGION = "us-east-1"


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, and the standard AWS variables pointing at it
    (the only configuration the store reads) for this module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "tuneforge-test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "tuneforge-secret")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        try:
            yield endpoint
        finally:
            server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


def new_bucket(endpoint: str) -> str:
    name = f"tf-{uuid.uuid4().hex[:16]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path) -> str:
    """The URL of an empty store: a local directory, or a prefix in a fresh bucket."""
    if request.param == "file":
        return f"file://{tmp_path / 'artifacts'}"
    endpoint = request.getfixturevalue("moto_endpoint")
    return f"s3://{new_bucket(endpoint)}/tuneforge/artifacts"


@pytest.fixture
def store(store_url) -> ArtifactStore:
    return ArtifactStore(store_url)


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# --- the contract, on both backends ----------------------------------------------------------------

def test_backend_is_the_one_asked_for(store, store_url):
    assert store.is_local == store_url.startswith("file://")
    assert store.url == store_url and not store.root.endswith("/")


def test_put_get_overwrite_and_missing_keys(store):
    blob = bytes(range(256)) * 3
    store.put_bytes("a/b/blob.bin", blob)
    store.put_bytes("a/empty", b"")
    assert store.get_bytes("a/b/blob.bin") == blob
    assert store.get_bytes("a/empty") == b""
    store.put_bytes("a/b/blob.bin", b"second")
    assert store.get_bytes("a/b/blob.bin") == b"second"
    for missing in ("a/b/nope", "nope", "a/b"):  # a prefix is not a key on either backend
        with pytest.raises(FileNotFoundError):
            store.get_bytes(missing)
        with pytest.raises(FileNotFoundError):
            next(store.iter_chunks(missing))


@pytest.mark.parametrize("key", ["../x", "a/../b", "a//b", "/abs", "a/.hidden", "a\\b", "a/%2e", "x\n", ""])
def test_bad_keys_are_refused_before_any_io(store, key):
    with pytest.raises(StorageKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(StorageKeyError):
        store.list(key)


def test_list_is_sorted_recursive_and_bounded_by_the_prefix(store):
    for key in ("p/z", "p/a/2", "p/a/10", "p/b/c/d.txt", "pq/x", "p-other/y", "q/p/1"):
        store.put_bytes(key, key.encode())
    assert store.list("p") == ["p/a/10", "p/a/2", "p/b/c/d.txt", "p/z"]
    assert store.list("p/a") == ["p/a/10", "p/a/2"]
    assert store.list("p/z") == []  # a key, not a prefix
    assert store.list("missing") == [] and store.list("p/missing/deeper") == []


def test_delete_prefix_removes_only_what_is_under_it(store):
    for key in ("runs/j1/a/1", "runs/j1/b/c/2", "runs/j10/keep", "runs/j1-x/keep", "runs/keep"):
        store.put_bytes(key, b"x")
    store.delete_prefix("runs/j1")
    assert store.list("runs") == ["runs/j1-x/keep", "runs/j10/keep", "runs/keep"]
    with pytest.raises(FileNotFoundError):
        store.get_bytes("runs/j1/a/1")
    store.delete_prefix("runs/j1")  # again: nothing there, no error
    store.delete_prefix("never/was")
    store.put_bytes("runs/j1/again", b"y")  # the prefix is usable again
    assert store.list("runs/j1") == ["runs/j1/again"]


def test_put_dir_and_get_dir_round_trip_a_folder_tree(store, tmp_path):
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": os.urandom(70_001),
             "sub/deeper/notes.txt": "Grüße ✓\n".encode(), "sub/empty.bin": b""}
    src = tree(tmp_path / "src", files)
    keys = store.put_dir(src, "models/ws/m1")
    assert keys == sorted(f"models/ws/m1/{rel}" for rel in files)
    assert store.list("models/ws/m1") == keys
    out = store.get_dir("models/ws/m1", tmp_path / "out")
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files


def test_copy_inside_the_store_and_streamed_digest(store, monkeypatch):
    """The registry's adapter copy: the object is copied inside the store (on S3 a server-side
    CopyObject: the copy never opens or reads the source through this process), and its size and
    sha256 are streamed from the copy, equal to the bytes' own."""
    import hashlib

    data = os.urandom(9 * 1024 * 1024 + 5)  # more than one 8 MiB read block
    store.put_bytes("runs/ws/j/attempt-1/adapter/adapter_model.safetensors", data)
    store.put_bytes("runs/ws/j/attempt-1/adapter/empty.txt", b"")
    if not store.is_local:
        with monkeypatch.context() as mp:
            for name in ("open", "cat_file", "get_file"):
                mp.setattr(store.fs, name, lambda *a, _n=name, **k: pytest.fail(f"copy read the object ({_n})"))
            store.copy("runs/ws/j/attempt-1/adapter/empty.txt", "models/ws/probe/empty.txt")
        assert store.get_bytes("models/ws/probe/empty.txt") == b""
    store.copy("runs/ws/j/attempt-1/adapter/adapter_model.safetensors", "models/ws/m/adapter_model.safetensors")
    store.copy("runs/ws/j/attempt-1/adapter/empty.txt", "models/ws/m/empty.txt")
    assert store.get_bytes("models/ws/m/adapter_model.safetensors") == data
    assert store.digest("models/ws/m/adapter_model.safetensors") == (len(data), hashlib.sha256(data).hexdigest())
    assert store.digest("models/ws/m/empty.txt") == (0, hashlib.sha256(b"").hexdigest())
    assert store.list("models/ws/m") == ["models/ws/m/adapter_model.safetensors", "models/ws/m/empty.txt"]
    with pytest.raises(FileNotFoundError):
        store.copy("runs/ws/j/attempt-1/adapter/missing", "models/ws/m/missing")
    with pytest.raises(FileNotFoundError):
        store.digest("models/ws/m/missing")


async def test_large_file_streams_in_chunks_through_file_chunks(store, tmp_path):
    """The download path every Download* RPC uses: offsets, one ``eof``, the bytes exact, and the
    empty file as one empty chunk, on both backends (the S3 one through ranged reads)."""
    big = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "big.bin").write_bytes(big)
    store.put_file(tmp_path / "big.bin", "datasets/ws/ds/big.bin")
    store.put_bytes("datasets/ws/ds/empty.jsonl", b"")
    chunks = [c async for c in file_chunks(store, "datasets/ws/ds", ["big.bin", "empty.jsonl"],
                                           chunk_size=256 * 1024)]
    big_chunks = [c for c in chunks if c.path == "big.bin"]
    assert len(big_chunks) == 13 and all(len(c.data) == 256 * 1024 for c in big_chunks[:-1])
    assert [c.offset for c in big_chunks] == [i * 256 * 1024 for i in range(13)]
    assert [c.eof for c in big_chunks] == [False] * 12 + [True]
    assert b"".join(c.data for c in big_chunks) == big
    assert [(c.path, c.data, c.eof) for c in chunks if c.path == "empty.jsonl"] == [("empty.jsonl", b"", True)]
    with pytest.raises(FileNotFoundError):
        [c async for c in file_chunks(store, "datasets/ws/ds", ["gone.jsonl"])]


def test_a_second_store_sees_writes_at_once(store_url, tmp_path):
    """Two processes (a trainer resuming another's checkpoints) on one bucket: no stale listing.
    With s3fs' listing cache on, the reader's own list() would cache the folder and the later
    read of the new key fail with FileNotFoundError (found so; hence ``use_listings_cache=False``)."""
    reader, writer = ArtifactStore(store_url), ArtifactStore(store_url)
    assert reader.list("runs/ws/j") == []
    writer.put_bytes("runs/ws/j/attempt-1/attempt.json", b"{}")
    assert reader.list("runs/ws/j") == ["runs/ws/j/attempt-1/attempt.json"]
    writer.put_bytes("runs/ws/j/attempt-1/result.json", b"done")
    assert b"".join(reader.iter_chunks("runs/ws/j/attempt-1/result.json")) == b"done"
    out = reader.get_dir("runs/ws/j", tmp_path / "seen")
    assert (out / "attempt-1/result.json").read_bytes() == b"done"
    writer.delete_prefix("runs/ws/j")
    assert reader.list("runs/ws/j") == []
    with pytest.raises(FileNotFoundError):
        next(reader.iter_chunks("runs/ws/j/attempt-1/result.json"))


def test_trainer_checkpoints_upload_list_and_verify(store, tmp_path):
    """The worker's own helpers (upload with completion marker, listing for resume, verified
    download) on the store, so resuming works the same from a bucket."""
    from tuneforge.trainer import worker as w

    ckpt = tree(tmp_path / "ckpt", {"trainer_state.json": json.dumps({"global_step": 4}).encode(),
                                    "adapter_model.safetensors": os.urandom(5000), "opt/state.pt": b"o" * 99})
    store.put_bytes(f"{w.attempt_prefix('ws', 'job', 1)}/{w.ATTEMPT_MARKER}", b"{}")
    assert w.upload_checkpoint(store, ckpt, w.checkpoint_key("ws", "job", 1, 4), 4)
    half = tree(tmp_path / "half", {"trainer_state.json": json.dumps({"global_step": 6}).encode()})
    store.put_dir(half, w.checkpoint_key("ws", "job", 1, 6))  # the uploader died before its marker
    store.put_bytes(f"{w.attempt_prefix('ws', 'job', 2)}/{w.ATTEMPT_MARKER}", b"{}")
    assert w.started_attempts(store, "ws", "job") == [1, 2]
    found = w.complete_checkpoints(store, "ws", "job", before_attempt=2)
    assert [(c.attempt, c.step) for c in found] == [(1, 4)]
    local = w.download_checkpoint(store, found[0], tmp_path / "resume")
    assert (local / "opt/state.pt").read_bytes() == b"o" * 99
    store.put_bytes(f"{found[0].key}/adapter_model.safetensors", b"tampered")
    with pytest.raises(w.CheckpointError, match="differs"):
        w.download_checkpoint(store, found[0], tmp_path / "resume")


# --- S3 configuration ---------------------------------------------------------------------------------

def test_endpoint_comes_from_the_standard_variables(moto_endpoint, monkeypatch):
    bucket = new_bucket(moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the S3-specific one wins
    assert remote_options("s3")["endpoint_url"] == moto_endpoint
    ArtifactStore(f"s3://{bucket}").put_bytes("k/one", b"1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # the general one alone serves too
    assert ArtifactStore(f"s3://{bucket}/").list("k") == ["k/one"]
    assert bucket_keys(moto_endpoint, bucket) == ["k/one"]  # a bucket root: keys at the top


# --- end to end: the dataset-builder on S3 --------------------------------------------------------------

@pytest.fixture
def s3_artifact_url(moto_endpoint, monkeypatch) -> str:
    """TUNEFORGE_ARTIFACT_URL on a fresh bucket, set before ``services`` reads its settings."""
    url = f"s3://{new_bucket(moto_endpoint)}/prod"
    monkeypatch.setenv("TUNEFORGE_ARTIFACT_URL", url)
    return url


async def test_dataset_snapshot_is_written_to_s3_and_downloaded(s3_artifact_url, moto_endpoint, services, tmp_path):
    endpoints, settings = services
    assert settings.resolved_artifact_url() == s3_artifact_url
    clients = await workspace(endpoints)
    try:
        lines = [{"messages": [{"role": "user", "content": f"question {i} ✓"},
                               {"role": "assistant", "content": f"answer {i}"}]} for i in range(40)]
        path = tmp_path / "in.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        assert (await sdk.import_file(clients, path)).imported == 40
        from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb

        built = await clients.dataset_builder.BuildDataset(dsb.BuildDatasetRequest(base_model="llama-3.2-1b", seed=7))
        ds = built.dataset
        bucket = s3_artifact_url.removeprefix("s3://").split("/", 1)[0]
        assert bucket_keys(moto_endpoint, bucket) == sorted(
            f"prod/{ds.artifact_path}/{f.path}" for f in built.files)
        assert not (settings.data_dir / "artifacts" / "datasets").exists()  # nothing went to local disk
        downloaded = await sdk.download_dataset(clients, ds.dataset_id, tmp_path / "dl")
        got = {p.name: p.read_bytes() for p in downloaded}
        assert sorted(got) == ["manifest.json", "test.jsonl", "train.jsonl"]
        for f in built.files:
            assert (len(got[f.path]), hashlib.sha256(got[f.path]).hexdigest()) == (f.size_bytes, f.sha256)
        assert ds.train_count + ds.test_count == 40
        assert len(got["train.jsonl"].splitlines()) == ds.train_count
    finally:
        await clients.close()
