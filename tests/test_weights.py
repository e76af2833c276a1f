"""Weights are input (issue 29.3): every load checks config against tensors before building, finiteness, sizes;
the registered weights are EMA-only bf16 safetensors; the sampler writes no image from non-finite output; an FID
is finite and >= 0 where results are read (29.4); reference statistics are a covariance."""

import json
import struct
import time

import numpy as np
import pytest
import torch

from maskdit.core.result import ResultError, read_result
from maskdit.evaluation import fid as fidlib
from maskdit.evaluation import sample
from maskdit.evaluation.evaluate import EvaluateResult
from maskdit.method import weights
from maskdit.method.checkpoint import CheckpointError, load_ema_model
from maskdit.method.diffusion import EDMPrecond, SamplerConfig
from maskdit.method.model import MaskDiT, model_config


def _state(cfg=None):
    cfg = cfg or model_config("tiny", in_channels=1)
    torch.manual_seed(0)
    net = MaskDiT(cfg).state_dict()
    return {"format_version": 1, "model_config": cfg.model_dump(), "model": net, "ema": dict(net), "step": 3,
            "optimizer": None}


def _saved(tmp_path, state) -> str:
    path = tmp_path / "ckpt-000000003.pt"
    torch.save(state, path)
    return str(path)


def test_a_crafted_depth_is_refused_before_the_network_is_built(tmp_path):
    state = _state()
    state["model_config"]["depth"] = 1_000_000  # built, this network would take tens of GB
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"depth 1000000 but the file has 2 blocks.*needs at least") as error:
        load_ema_model(_saved(tmp_path, state))
    assert time.monotonic() - start < 5 and "\n" not in str(error.value)


def test_a_tensor_of_the_wrong_shape_or_an_unknown_one_is_one_line(tmp_path):
    state = _state()
    state["ema"]["final_layer.linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"final_layer.linear.weight \(3, 3\) != \(4, 16\)") as error:
        load_ema_model(_saved(tmp_path, state))
    assert "\n" not in str(error.value)
    state = _state()
    state["model"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected \['extra.weight'\]"):
        load_ema_model(_saved(tmp_path, state))
    state = _state()
    state["model_config"]["hidden_size"] = "wide"
    with pytest.raises(CheckpointError, match="model_config is invalid \\(hidden_size"):
        load_ema_model(_saved(tmp_path, state))


def test_non_finite_weights_refuse_to_load(tmp_path):
    state = _state()
    state["ema"] = {k: torch.full_like(v, float("nan")) for k, v in state["ema"].items()}
    with pytest.raises(CheckpointError, match="EMA tensor|ema tensor"):
        load_ema_model(_saved(tmp_path, state))


def test_registered_weights_are_bf16_safetensors_of_the_ema_alone(tmp_path):
    state = _state()
    path = weights.save_ema(tmp_path / "ema.safetensors", state["ema"], model_config=state["model_config"],
                            step=3, train_config={"steps": 9})
    loaded = weights.read_ema(path, "ema.safetensors")
    assert (loaded["step"], loaded["train_config"], loaded["model_config"]) == (3, {"steps": 9},
                                                                               state["model_config"])
    for key, value in state["ema"].items():  # bf16 rounding: a relative error of at most 2^-8 per weight
        assert loaded["ema"][key].dtype == torch.float32
        assert torch.equal(loaded["ema"][key], value.to(torch.bfloat16).float())
    fp32_bytes = sum(v.numel() * 4 for v in state["ema"].values())
    assert path.stat().st_size < fp32_bytes * 0.5 + 8192  # half the fp32 size, plus the JSON header


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_a_tensor_declared_16_gib_is_refused_before_any_allocation(tmp_path):
    cfg = model_config("tiny", in_channels=1)
    path = tmp_path / "huge.safetensors"
    _raw_safetensors(path, {"__metadata__": {"model_config": json.dumps(cfg.model_dump()), "step": "1"},
                            "mask_token": {"dtype": "F32", "shape": [1 << 32], "data_offsets": [0, 16 << 30]}},
                     b"\0" * 64)
    with pytest.raises(weights.WeightsError, match="huge.safetensors") as error:
        weights.read_ema(path, "huge.safetensors")
    assert "\n" not in str(error.value)
    # a header that matches the file but not the config: refused from the header alone
    _raw_safetensors(path, {"__metadata__": {"model_config": json.dumps(cfg.model_dump()), "step": "1"},
                            "mask_token": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, b"\0" * 64)
    with pytest.raises(weights.WeightsError, match="depth 2 but the file has 0 blocks"):
        weights.read_ema(path, "huge.safetensors")


def test_a_digest_mismatch_names_both_digests(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"registered")
    recorded = weights.sha256_file(path)
    path.write_bytes(b"altered")
    with pytest.raises(weights.WeightsError, match=f"models:/m/1: sha256 {weights.sha256_file(path)} but "
                                                   f"{recorded} was recorded"):
        weights.check_digest(path, recorded, "models:/m/1")


def test_the_sampler_writes_no_image_from_non_finite_output():
    torch.manual_seed(0)
    net = MaskDiT(model_config("tiny", in_channels=1))
    with torch.no_grad():
        net.final_layer.linear.bias.fill_(float("nan"))
    precond = EDMPrecond(net).eval().requires_grad_(False)
    decode = lambda x0: x0.clamp(-1, 1).add(1).mul(127.5).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)  # noqa: E731
    with pytest.raises(sample.SampleError, match=r"seeds \[0, 1\] holds NaN or inf; no image written"):
        sample.generate(precond, decode, torch.tensor([1, 2]), [0, 1], SamplerConfig(num_steps=2), 2)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-2050000.0"])
def test_an_fid_that_is_no_distance_is_refused_where_the_result_is_read(tmp_path, value):
    fields = dict(fid=1.0, num_samples=10, sampler=SamplerConfig().model_dump(), seed=0, checkpoint="c",
                  ref_stats="r.npz", inception="bundled", world_size=1, seconds=1.0, grid="g.png")
    text = json.dumps({"kind": "evaluate", **fields}).replace('"fid": 1.0', f'"fid": {value}')
    (tmp_path / "result.json").write_text(text)
    with pytest.raises(ResultError, match="fid"):
        read_result(EvaluateResult, str(tmp_path / "result.json"))


def _stats(sigma):
    return fidlib.FIDStats(mu=np.zeros(fidlib.FEATURE_DIM), sigma=sigma)


def test_reference_statistics_must_be_a_covariance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((fidlib.FEATURE_DIM, 64))
    good = x @ x.T / 64  # (D, D) PSD of rank 64
    _stats(good.copy()).check()
    bad = good.copy()
    bad[0, 0] = -50.0  # a negative variance: FID came out -2e6 from such a file
    with pytest.raises(fidlib.FIDError, match="sigma is not a covariance \\(eigenvalue"):
        _stats(bad).check("ref.npz")
    skew = good.copy()
    skew[0, 1] += 1.0
    with pytest.raises(fidlib.FIDError, match="asymmetric by 1"):
        _stats(skew).check("ref.npz")
    a = _stats(good.copy()).check()
    assert fidlib.fid_from_stats(a, a) >= -fidlib.rounding_slack(a, a)  # the same fit: 0 up to rounding


def test_reference_statistics_record_their_resolution_and_other_sizes_are_named(tmp_path):
    stats = fidlib.FIDStats(mu=np.zeros(fidlib.FEATURE_DIM), sigma=np.eye(fidlib.FEATURE_DIM), n=4, resolution=8)
    fidlib.save_stats(stats, str(tmp_path / "ref.npz"))
    loaded = fidlib.load_stats(str(tmp_path / "ref.npz"))
    assert loaded.resolution == 8
    assert loaded.check_resolution(8, 8, "ref.npz") is None
    assert "ref.npz fits 8 px images and the samples are 32x32 px" in loaded.check_resolution(32, 32, "ref.npz")
    np.savez(tmp_path / "adm.npz", mu=np.zeros(fidlib.FEATURE_DIM), sigma=np.eye(fidlib.FEATURE_DIM))
    assert fidlib.load_stats(str(tmp_path / "adm.npz")).check_resolution(32, 32, "adm.npz") is None  # ADM: none
