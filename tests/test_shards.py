"""Shard format, manifest and LatentSet, with hand-written shards (no VAE needed)."""

import hashlib
import json
import os
import shutil
import stat
import threading

import pytest
import torch

from maskdit.core import storage
from maskdit.data import nodecache, shards
from maskdit.data.latents import LatentSet, load_dataset
from maskdit.data.shards import Manifest, ShardError, read_manifest


def write_latent_dataset(uri: str, sizes=(5, 5, 3), shape=(4, 2, 2), scale=0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-made latent dataset; returns all (mean, logvar, labels)."""
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    mean = (torch.randn((n, *shape), generator=g) * 3).half()
    logvar = (torch.rand((n, *shape), generator=g) * -8).half()
    labels = torch.randint(0, 3, (n,), generator=g)
    infos, start = [], 0
    for k, size in enumerate(sizes):
        part = slice(start, start + size)
        infos.append(shards.write_shard(uri, k, {"mean": mean[part], "logvar": logvar[part], "labels": labels[part]}))
        start += size
    shards.write_manifest(uri, Manifest(space="latent", count=n, images=n, channels=shape[0], resolution=16,
                                        shape=shape, dtype="float16", scale_factor=scale, vae="tiny",
                                        class_names=["a", "b", "c"], shard_size=5, shards=infos))
    return mean.float(), logvar.float(), labels


def test_round_trip_and_draw(tmp_path):
    uri = str(tmp_path / "ds")
    mean, logvar, labels = write_latent_dataset(uri)
    data = load_dataset(uri, cache_dir=tmp_path / "cache")
    assert isinstance(data, LatentSet)
    assert len(data) == 13 and data.num_classes == 3 and data.shape == (4, 2, 2)
    assert torch.equal(data.labels, labels) and data.labels.dtype == torch.long
    idx = torch.tensor([12, 0, 7, 5, 4, 7])  # across all three shards, with a repeat
    m, lv = data.moments(idx)
    assert torch.equal(m, mean[idx]) and torch.equal(lv, logvar[idx])
    x0 = data.draw(idx, generator=torch.Generator().manual_seed(3))
    eps = torch.randn((6, 4, 2, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x0, 0.5 * (mean[idx] + torch.exp(logvar[idx] / 2) * eps))
    assert x0.dtype == torch.float32
    with pytest.raises(IndexError, match="13 samples"):
        data.draw(torch.tensor([13]))


def test_tensors_are_memory_mapped(tmp_path):
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    path = tmp_path / "ds" / "shards" / shards.shard_name(0)
    tensors = nodecache.mmap_safetensors(path)
    before = tensors["mean"].clone()
    tensors["mean"].zero_()  # copy-on-write: the file is untouched
    assert torch.equal(nodecache.mmap_safetensors(path)["mean"], before)


def test_checksum_mismatch_names_the_shard(tmp_path):
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    bad = tmp_path / "ds" / "shards" / shards.shard_name(1)
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"shard-000001\.safetensors is corrupt"):
        load_dataset(uri, cache_dir=tmp_path / "cache")


def test_ranks_of_one_launch_share_the_check(tmp_path, monkeypatch):
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")  # as under torchrun: this process is one local rank
    load_dataset(uri, cache_dir=tmp_path / "cache")
    calls = []
    real = nodecache.file_sha256
    monkeypatch.setattr(nodecache, "file_sha256", lambda *a: (calls.append(a[0]), real(*a))[1])
    load_dataset(uri, cache_dir=tmp_path / "cache")  # another rank of the same launch
    assert calls == []
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")  # a restart: a new launch hashes again
    load_dataset(uri, cache_dir=tmp_path / "cache")
    assert len(calls) == 3


def test_verify_rehashes_a_shard_changed_in_place(tmp_path):
    """Issue 16.9: bytes changed with size and mtime kept were trusted after a first verified load."""
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    load_dataset(uri, cache_dir=tmp_path / "cache")
    bad = tmp_path / "ds" / "shards" / shards.shard_name(0)
    before = bad.stat()
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))
    os.utime(bad, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ShardError, match=r"shard-000000\.safetensors is corrupt"):
        load_dataset(uri, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["/tmp/evil.safetensors", "../../evil.safetensors", "sub/x.safetensors",
                                  "..safetensors", ".hidden.safetensors", "x.py"])
def test_shard_names_must_be_plain(tmp_path, name):
    """Issue 16.1: a manifest naming an absolute path or `..` made load_dataset write (and delete) there."""
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="not a plain file name"):
        load_dataset(uri, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before any I/O


@pytest.mark.parametrize(("content", "message"), [(b"", "is empty"), (b"{}", "is not a valid manifest"),
                                                  (b"not json", "is not a valid manifest")])
def test_broken_manifest_is_one_line(tmp_path, content, message):
    """Issue 16.10: a manifest that is not JSON, `{}` or empty gave a pydantic traceback."""
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ShardError, match=message) as error:
        read_manifest(str(tmp_path))
    assert "\n" not in str(error.value) and "manifest.json" in str(error.value)


@pytest.mark.parametrize("damage", ["length", "json", "offsets"])
def test_damaged_header_with_verify_off_is_one_line(tmp_path, damage):
    """Issue 16.10: a damaged safetensors header (verify off) raised from json / torch.frombuffer."""
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    path = tmp_path / "ds" / "shards" / shards.shard_name(1)
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    if damage == "length":
        raw[:8] = (10**12).to_bytes(8, "little")
    elif damage == "json":
        raw[8:12] = b"\xff\xfe{["
    else:
        header = raw[8 : 8 + header_len].decode().replace('"data_offsets":[0,', '"data_offsets":[9,')
        raw[8 : 8 + header_len] = header.encode().ljust(header_len)
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"shard-000001\.safetensors is damaged") as error:
        load_dataset(uri, verify=False, cache_dir=tmp_path / "cache")
    assert "\n" not in str(error.value)


def test_cache_is_private_and_ignores_planted_links(tmp_path, monkeypatch):
    """Issue 16.4: a world-readable shared cache; a symlink planted at .lock got truncated."""
    monkeypatch.delenv("MASKDIT_DATA_CACHE", raising=False)
    monkeypatch.setattr(nodecache.tempfile, "gettempdir", lambda: str(tmp_path / "shared"))
    monkeypatch.setattr(nodecache, "SHM", tmp_path / "no-shm")
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    base = nodecache.default_cache_dir()
    assert base == tmp_path / "shared" / f"maskdit-data-{os.getuid()}"
    target = tmp_path / "victim"
    target.write_text("precious")
    cache = base / hashlib.sha256(uri.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, mode=0o777)
    os.chmod(base, 0o777)
    os.chmod(cache, 0o777)
    (cache / ".lock").symlink_to(target)
    load_dataset(uri)
    assert target.read_text() == "precious"
    assert stat.S_IMODE(base.stat().st_mode) == 0o700 and stat.S_IMODE(cache.stat().st_mode) == 0o700
    shutil.rmtree(base)
    base.symlink_to(tmp_path / "elsewhere")  # another user's folder or link at our name: refused
    with pytest.raises(ShardError, match="is a symlink, not a private folder"):
        load_dataset(uri)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json under"):
        read_manifest(str(tmp_path))


def test_pixel_dataset(tmp_path):
    uri = str(tmp_path / "px")
    pixels = torch.tensor([[[[0, 255], [128, 64]]], [[[255, 255], [0, 0]]]], dtype=torch.uint8)  # (2, 1, 2, 2)
    info = shards.write_shard(uri, 0, {"pixels": pixels, "labels": torch.tensor([0, 1])})
    shards.write_manifest(uri, Manifest(space="pixel", count=2, images=2, channels=1, resolution=2, shape=(1, 2, 2),
                                        dtype="uint8", scale_factor=1.0, class_names=["0", "1"], shard_size=2,
                                        shards=[info]))
    data = load_dataset(f"{uri}/manifest.json", cache_dir=tmp_path / "cache")
    x0 = data.draw(torch.tensor([0, 1]))
    torch.testing.assert_close(x0, pixels.float() / 127.5 - 1)
    images = data.decode(x0)
    assert images.shape == (2, 2, 2, 3) and images.dtype == torch.uint8
    assert torch.equal(images[..., 0], pixels[:, 0]) and torch.equal(images[..., 2], pixels[:, 0])


@pytest.mark.slow
def test_s3_dataset_downloads_once_per_node(bucket, tmp_path, monkeypatch):
    uri = f"s3://{bucket}/ds"
    mean, _, _ = write_latent_dataset(uri)
    downloads = []
    real_get_file = storage.get_file
    monkeypatch.setattr(storage, "get_file", lambda u, p: (downloads.append(u), real_get_file(u, p)))
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_dataset(uri, cache_dir=tmp_path / "c")))
               for _ in range(4)]  # like 4 local ranks: the file lock lets one fetch
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(downloads) == 3  # one per shard
    assert all(torch.equal(r.moments(torch.arange(13))[0], mean) for r in results)


@pytest.mark.slow
def test_s3_corrupt_shard_is_detected(bucket, tmp_path):
    uri = f"s3://{bucket}/ds"
    write_latent_dataset(uri)
    name = storage.join(uri, "shards", shards.shard_name(2))
    raw = bytearray(storage.get_bytes(name))
    raw[100] ^= 0x01
    storage.put_bytes(name, bytes(raw))
    with pytest.raises(ShardError, match=f"{name} is corrupt"):
        load_dataset(uri, cache_dir=tmp_path / "c")


@pytest.mark.slow
def test_too_small_cache_fails_before_downloading(bucket, tmp_path, monkeypatch):
    uri = f"s3://{bucket}/ds"
    write_latent_dataset(uri)
    monkeypatch.setattr(nodecache.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(ShardError, match="needs .* GiB more: enlarge /dev/shm"):
        load_dataset(uri, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").rglob("*.safetensors"))


@pytest.mark.slow
def test_s3_cache_does_not_follow_planted_shard_links(bucket, tmp_path):
    """Issue 16.4: a symlink at a cached shard's name was read through (and trusted with verify off)."""
    uri = f"s3://{bucket}/ds-links"
    mean, _, _ = write_latent_dataset(uri)
    cache = tmp_path / "c" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, mode=0o700)
    planted = bytearray(storage.get_bytes(storage.join(uri, "shards", shards.shard_name(0))))
    planted[-64:] = bytes(64)  # same size, other values
    victim = tmp_path / "victim"
    victim.write_bytes(bytes(planted))
    (cache / shards.shard_name(0)).symlink_to(victim)
    data = load_dataset(uri, verify=False, cache_dir=tmp_path / "c")
    assert torch.equal(data.moments(torch.arange(13))[0], mean)
    assert victim.read_bytes() == bytes(planted) and not (cache / shards.shard_name(0)).is_symlink()


@pytest.mark.parametrize("bad, said", [(float("nan"), "holds NaN or Inf"), (float("inf"), "holds NaN or Inf"),
                                       (6e4, "holds 6.*outside")])
def test_values_are_checked_with_the_checksum_naming_shard_and_row(tmp_path, bad, said):
    """A shard whose checksum is right but whose values cannot train: refused at load, naming shard and row."""
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)  # shards of 5, 5 and 3 rows
    manifest = read_manifest(uri)
    path = tmp_path / "ds" / "shards" / manifest.shards[1].name
    tensors = nodecache.mmap_safetensors(path)
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["mean"][3, 1, 0, 1] = bad  # row 8 of the dataset, row 3 of shard 1
    info = shards.write_shard(uri, 1, tensors)  # a valid checksum of the bad values
    shards.write_manifest(uri, manifest.model_copy(update={"shards": [manifest.shards[0], info, manifest.shards[2]]}))
    with pytest.raises(ShardError, match=rf"shard .*{manifest.shards[1].name}: row 3 of 'mean' {said}"):
        load_dataset(uri, cache_dir=tmp_path / "cache")
    load_dataset(uri, verify=False, cache_dir=tmp_path / "cache")  # no checksum pass, no value check


def test_the_value_limits_follow_the_scale_factor_and_the_vaes_logvar_clamp():
    ok = {"mean": torch.full((2, 4), 80 / 0.18215 * 0.999), "logvar": torch.tensor([[-30.0, 20.0]] * 2)}
    shards.check_values(ok, "s", 0.18215)  # at the limits: accepted
    with pytest.raises(ShardError, match="row 1 of 'mean' holds 440"):
        shards.check_values({"mean": torch.tensor([[1.0], [440.0]])}, "s", 0.18215)  # 0.18215 * 440 = 80.1
    with pytest.raises(ShardError, match="row 0 of 'logvar_flip' holds 21"):
        shards.check_values({"logvar_flip": torch.tensor([[21.0]])}, "s", 1.0)
