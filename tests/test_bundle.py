"""What a registered model carries (maskdit.registry.bundle): pinned requirements, its own maskdit code, the model card."""

from importlib import metadata
from pathlib import Path

import pytest

from maskdit.data.identity import DatasetId
from maskdit.data.shards import Manifest
from maskdit.evaluation.evaluate import EvaluateResult
from maskdit.method.diffusion import SamplerConfig
from maskdit.method.model import model_config
from maskdit.registry.bundle import copy_code, model_card, preset_name, requirements


def test_requirements_pin_what_inference_imports_as_installed_and_no_maskdit():
    pixel, latent = requirements(latent=False), requirements(latent=True)
    pins = dict(r.split("==") for r in latent)
    assert pins["torch"] == metadata.version("torch").split("+")[0]  # the index's release, not a local build
    assert pins["mlflow"] == metadata.version("mlflow") and pins["diffusers"] == metadata.version("diffusers")
    assert not any(r.startswith("diffusers") for r in pixel)  # pixel space: no VAE
    assert any(r.startswith("safetensors") for r in pixel)  # the registered weights are safetensors
    assert not any(r.startswith("maskdit") for r in latent)  # the code travels inside the model instead
    assert set(pixel) < set(latent)


def test_the_models_code_is_the_imported_maskdit_without_bytecode(tmp_path):
    import maskdit

    code = copy_code(tmp_path)
    assert code == tmp_path / "maskdit"
    root = Path(maskdit.__path__[0])
    source = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    assert sorted(p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file()) == source
    assert "registry/register.py" in source and "configs/mnist_pretrain.yaml" in source


@pytest.mark.parametrize("name", ["XL/2", "B/4", "tiny"])
def test_preset_name_of_a_model_config(name):
    assert preset_name(model_config(name, num_classes=7).model_dump()) == name
    assert preset_name(model_config("tiny", hidden_size=48).model_dump()) is None


def _manifest(**changes) -> Manifest:
    fields = dict(space="latent", count=2_562_334, images=1_281_167, channels=4, resolution=256, shape=(4, 32, 32),
                  dtype="float16", scale_factor=0.18215, vae="stabilityai/sd-vae-ft-mse",
                  class_names=[str(i) for i in range(1000)], flip=True, shard_size=1000, shards=[])
    return Manifest(**{**fields, **changes})


def test_the_model_card_names_data_recipe_fid_settings_and_how_to_sample(tmp_path):
    for step in (100, 400_000):
        (tmp_path / "pretrain" / f"ckpt-{step:09d}.pt").parent.mkdir(exist_ok=True)
        (tmp_path / "pretrain" / f"ckpt-{step:09d}.pt").write_bytes(b"")
    evaluation = EvaluateResult(fid=5.69, precision=0.8, recall=0.55, num_samples=50_000,
                                sampler=SamplerConfig(), seed=0, checkpoint="s3://m/tune/ckpt-000037500.pt",
                                ref_stats="s3://m/VIRTUAL_imagenet256_labeled.npz", ref_stats_sha256="c" * 64,
                                inception="bundled", inception_sha256="d" * 64, world_size=8, seconds=1.0,
                                grid="s3://m/grid.png")
    identity = DatasetId(digest="a" * 64, name="train-aaaaaaaaaaaa", files=1_281_167, bytes=10**11)
    card = model_card("maskdit-xl2", dataset_uri="s3://m/imagenet256", manifest=_manifest(identity=identity),
                      manifest_sha256="e" * 64,
                      model_config=model_config("XL/2").model_dump(),
                      train_config={"init_from": str(tmp_path / "pretrain"), "mask": {"ratio": 0.0, "schedule": "zero"},
                                    "batch": {"global_batch": 1024}, "optim": {"lr": 5e-5}},
                      step=37_500, fid=5.69, sampler=SamplerConfig(), evaluation=evaluation, source_run="abc123")
    for shown in ("# maskdit-xl2", "`s3://m/imagenet256`", "e" * 64, "| dataset id | `" + "a" * 64,
                  "2,562,334 (1,281,167 images, with flipped copies)", "| classes | 1000 |",
                  "4x32x32 (latent space, 256 px images)", "VAE `stabilityai/sd-vae-ft-mse` (inside",
                  "XL/2: hidden 1152, depth 28, patch 2, decoder depth 8", "(step 400,000)",
                  "37,500 steps, mask ratio 0.0 (zero), global batch 1024, lr 5e-05", "MLflow run `abc123`",
                  "| FID | 5.69 |", "50,000 (seed 0)", "`s3://m/VIRTUAL_imagenet256_labeled.npz` (sha256 `" + "c" * 64,
                  "bundled (sha256 `" + "d" * 64, "0.8 / 0.55", "40 Heun steps, CFG scale 1.5", "class_label` (0..999)",
                  'mlflow.pyfunc.load_model("models:/maskdit-xl2@champion")',
                  "mlflow models serve -m models:/maskdit-xl2@champion --host 127.0.0.1 --port 5000"):
        assert shown in card, shown
    pixel = model_card("demo", dataset_uri="d", manifest=_manifest(space="pixel", vae=None, flip=False),
                       manifest_sha256="f", model_config=model_config("tiny").model_dump(), train_config={},
                       step=5, fid=80.0, sampler=SamplerConfig(), evaluation=None)
    assert "| decoder | none (pixel space) |" in pixel and "none: trained from scratch" in pixel
    bare = model_card("bare", dataset_uri="d", manifest=_manifest(vae=None), manifest_sha256="f",
                      model_config=model_config("tiny").model_dump(), train_config={}, step=5, fid=80.0,
                      sampler=SamplerConfig(), evaluation=None)
    assert "| decoder | none recorded: latents it cannot decode to images |" in bare  # synthetic latents
    assert "| training run | - |" in pixel and "reference statistics" not in pixel and "dataset id" not in pixel


def test_the_model_class_name_of_the_flat_layout_still_resolves():
    """A version registered by maskdit <= 0.2 pickled its python_model as `maskdit.registry.MaskDiTModel`."""
    import pickle

    from maskdit.registry.pyfunc import MaskDiTModel

    assert pickle.loads(b"cmaskdit.registry\nMaskDiTModel\n.") is MaskDiTModel
