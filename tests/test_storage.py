"""maskdit.core.storage against local paths and a real S3 server (SeaweedFS on loopback)."""

import io
import os
import socket
import threading

import pytest

from maskdit.core import s3, storage
from maskdit.core.s3 import MiB
from maskdit.core.storage import ObjectNotFound, StorageError


class FailingReader(io.RawIOBase):
    """A source that yields `fail_after` bytes and then raises, like a crashed producer."""

    def __init__(self, fail_after: int, before_failing=None):
        self.left = fail_after
        self.before_failing = before_failing  # called once, right before the crash

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.left <= 0:
            if self.before_failing is not None:
                self.before_failing()
            raise OSError("producer crashed")
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


# --- local -----------------------------------------------------------------------------------


def test_local_round_trip_and_listing(tmp_path):
    root = tmp_path / "store"
    storage.put_bytes(storage.join(str(root), "a", "b.bin"), b"hello")
    storage.put_file(root / "a" / "b.bin", f"file://{root}/c.bin")
    assert storage.get_bytes(f"file://{root}/a/b.bin") == b"hello"
    assert storage.exists(root / "c.bin") and not storage.exists(root / "nope")
    storage.get_file(str(root / "c.bin"), tmp_path / "out" / "c.bin")
    assert (tmp_path / "out" / "c.bin").read_bytes() == b"hello"
    assert storage.list_uris(str(root)) == [str(root / "a" / "b.bin"), str(root / "c.bin")]
    assert storage.list_uris(str(tmp_path / "missing")) == []
    storage.delete(str(root / "c.bin"))
    storage.delete(str(root / "c.bin"))  # idempotent
    assert not storage.exists(str(root / "c.bin"))
    with pytest.raises(ObjectNotFound, match="nope"):
        storage.get_bytes(str(root / "nope"))


def test_local_write_is_atomic(tmp_path):
    target = tmp_path / "ckpt.pt"
    storage.put_bytes(str(target), b"old")
    with pytest.raises(StorageError, match="producer crashed"):
        storage.put_fileobj(FailingReader(3 * MiB), str(target))
    assert target.read_bytes() == b"old"  # the reader never saw a half-written file
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no temp file is left behind


def test_join():
    assert storage.join("s3://b/run/", "shards", "x") == "s3://b/run/shards/x"
    assert storage.join("/data", "x", "y") == "/data/x/y"
    assert storage.join("file:///data", "x") == "file:///data/x"


# --- S3 (real server) ------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_round_trip(bucket, tmp_path):
    uri = f"s3://{bucket}/dir/obj.bin"
    assert not storage.exists(uri)
    storage.put_bytes(uri, b"payload")
    assert storage.exists(uri)
    assert storage.get_bytes(uri) == b"payload"
    (tmp_path / "f").write_bytes(b"from file")
    storage.put_file(tmp_path / "f", f"s3://{bucket}/dir/f")
    storage.get_file(f"s3://{bucket}/dir/f", tmp_path / "g")
    assert (tmp_path / "g").read_bytes() == b"from file"
    storage.get_tree(f"s3://{bucket}/dir", tmp_path / "tree")
    assert sorted(os.listdir(tmp_path / "tree")) == ["f", "obj.bin"]
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(ObjectNotFound, match="obj.bin"):
        storage.get_bytes(uri)
    with pytest.raises(ObjectNotFound):
        storage.get_file(uri, tmp_path / "h")
    assert not (tmp_path / "h").exists()


@pytest.mark.slow
def test_s3_multipart(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(s3.SETTINGS, "multipart_threshold", 5 * MiB)
    monkeypatch.setattr(s3.SETTINGS, "multipart_chunksize", 5 * MiB)
    data = os.urandom(12 * MiB)  # 3 parts
    (tmp_path / "big").write_bytes(data)
    uri = f"s3://{bucket}/big.bin"
    storage.put_file(tmp_path / "big", uri)
    head = s3.client().head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # really went through a 3-part upload
    storage.get_file(uri, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


@pytest.mark.slow
@pytest.mark.parametrize("size", [1 * MiB, 12 * MiB], ids=["single-put", "multipart"])
def test_s3_interrupted_upload_leaves_nothing(bucket, monkeypatch, size):
    monkeypatch.setattr(s3.SETTINGS, "multipart_threshold", 5 * MiB)
    monkeypatch.setattr(s3.SETTINGS, "multipart_chunksize", 5 * MiB)
    uri = f"s3://{bucket}/partial.bin"
    calls = []
    part_sent = threading.Event()  # the crash waits for a part in flight: the abort must clean it up

    def record(op, **_):
        calls.append(op)
        if op == "UploadPart":
            part_sent.set()

    events = s3.client().meta.events
    for op in ("CreateMultipartUpload", "UploadPart", "AbortMultipartUpload"):
        events.register(f"before-call.s3.{op}", lambda op=op, **kw: record(op, **kw), unique_id=f"count-{op}")
    wait = (lambda: part_sent.wait(timeout=30)) if size > 5 * MiB else None
    try:
        with pytest.raises((StorageError, OSError)):
            storage.put_fileobj(FailingReader(size, before_failing=wait), uri)
    finally:
        for op in ("CreateMultipartUpload", "UploadPart", "AbortMultipartUpload"):
            events.unregister(f"before-call.s3.{op}", unique_id=f"count-{op}")
    if size > 5 * MiB:  # parts were uploaded, then the upload was aborted
        assert calls[0] == "CreateMultipartUpload" and "UploadPart" in calls and calls[-1] == "AbortMultipartUpload"
    assert not storage.exists(uri)
    assert storage.list_uris(f"s3://{bucket}") == []
    uploads = s3.client().list_multipart_uploads(Bucket=bucket)
    assert not uploads.get("Uploads")  # the failed multipart upload was aborted


@pytest.mark.slow
def test_s3_listing_paginates(bucket, monkeypatch):
    monkeypatch.setattr(s3.SETTINGS, "list_page_size", 3)
    calls = []
    client = s3.client()
    client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1), unique_id="count-list")
    try:
        names = [f"s3://{bucket}/p/{i:02d}" for i in range(10)]
        for name in reversed(names):
            storage.put_bytes(name, b"x")
        storage.put_bytes(f"s3://{bucket}/p-other", b"x")  # same string prefix, other folder
        assert storage.list_uris(f"s3://{bucket}/p") == names
    finally:
        client.meta.events.unregister("before-call.s3.ListObjectsV2", unique_id="count-list")
    assert len(calls) >= 4  # 10 keys, 3 a page


@pytest.mark.slow
def test_s3_wrong_credentials(bucket, monkeypatch, s3_env):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="credentials were rejected") as info:
        storage.put_bytes(f"s3://{bucket}/x", b"1")
    assert f"s3://{bucket}/x" in str(info.value) and s3_env.endpoint in str(info.value)
    with pytest.raises(StorageError, match="credentials"):
        storage.exists(f"s3://{bucket}/x")


@pytest.mark.slow
def test_s3_missing_bucket(s3_env, tmp_path):
    for call in (lambda u: storage.put_bytes(u, b"1"), storage.get_bytes, storage.exists, storage.list_uris,
                 lambda u: storage.get_file(u, tmp_path / "x")):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as info:
            call("s3://no-such-bucket/key")
        assert s3_env.endpoint in str(info.value)


def test_s3_unreachable_endpoint(monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(StorageError, match="unreachable") as info:
        storage.get_bytes("s3://bucket/key")
    assert endpoint in str(info.value) and "s3://bucket/key" in str(info.value)


def test_redact_masks_userinfo_and_secret_query_values():
    """Issue 16.5: credentials in URIs must not reach logs, MLflow params or stored configs."""
    from maskdit.core.storage import redact

    assert redact("http://alice:pa%40ss@mlflow:5000/x") == "http://***@mlflow:5000/x"
    presigned = "https://h/o?X-Amz-Signature=ab&X-Amz-Date=1&token=t"
    assert redact(presigned) == "https://h/o?X-Amz-Signature=***&X-Amz-Date=1&token=***"
    assert redact({"tracking": {"uri": "http://u:p@h"}, "steps": 5, "tags": ["s3://b/k"]}) == {
        "tracking": {"uri": "http://***@h"}, "steps": 5, "tags": ["s3://b/k"]}
    assert redact("bob@example.com wrote s3://bucket/key") == "bob@example.com wrote s3://bucket/key"


def test_get_tree_writes_nothing_outside_its_folder(bucket, tmp_path, monkeypatch):
    """AWS S3 keys may hold '..' (SeaweedFS refuses to store them, so the listing adds one here): such a key
    is refused before any object is written, never written above the folder."""
    storage.put_bytes(f"s3://{bucket}/vae/config.json", b"{}")
    listed = storage.list_uris(f"s3://{bucket}/vae")
    for key in ("vae/../../escaped.txt", "vae/sub/../../../escaped.txt"):
        monkeypatch.setattr(storage, "list_uris", lambda uri, key=key: [*listed, f"s3://{bucket}/{key}"])
        target = tmp_path / "a" / "b" / "vae"
        with pytest.raises(StorageError, match=r"outside .*remove or rename"):
            storage.get_tree(f"s3://{bucket}/vae", target)
        assert not list(tmp_path.rglob("escaped.txt")) and not target.exists()
    monkeypatch.setattr(storage, "list_uris", lambda uri: listed)
    assert (storage.get_tree(f"s3://{bucket}/vae", tmp_path / "ok") / "config.json").read_bytes() == b"{}"
