"""Shard format, manifest and LatentSet, with hand-written shards (no VAE needed)."""

import threading

import pytest
import torch

from maskdit import shards, storage
from maskdit.shards import LatentSet, Manifest, ShardError, load_dataset, read_manifest


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
    tensors = shards.mmap_safetensors(path)
    before = tensors["mean"].clone()
    tensors["mean"].zero_()  # copy-on-write: the file is untouched
    assert torch.equal(shards.mmap_safetensors(path)["mean"], before)


def test_checksum_mismatch_names_the_shard(tmp_path):
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    bad = tmp_path / "ds" / "shards" / shards.shard_name(1)
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"shard-000001\.safetensors is corrupt"):
        load_dataset(uri, cache_dir=tmp_path / "cache")


def test_verified_local_shards_are_not_rehashed(tmp_path, monkeypatch):
    uri = str(tmp_path / "ds")
    write_latent_dataset(uri)
    load_dataset(uri, cache_dir=tmp_path / "cache")
    calls = []
    monkeypatch.setattr(shards, "file_sha256", lambda p: calls.append(p))
    load_dataset(uri, cache_dir=tmp_path / "cache")
    assert calls == []


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
    monkeypatch.setattr(shards.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(ShardError, match="needs .* GiB more: enlarge /dev/shm"):
        load_dataset(uri, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").rglob("*.safetensors"))
