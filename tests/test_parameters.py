"""A run's parameters are checked before anything runs: by `submit`/`schedule` before the KFP host is
contacted, and by the DAG's check step on KFP's local runner; failures to reach a host are one line."""

import inspect
import math
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from components.parameters import ParameterError, check_parameters
from maskdit.core.errors import EXIT_USER_ERROR
from pipelines.cli import pipeline_app
from pipelines.maskdit_pipeline import PIPELINE_YAML, compile_pipeline, maskdit_pipeline


def _defaults() -> dict:
    return {name: p.default for name, p in inspect.signature(maskdit_pipeline.pipeline_func).parameters.items()}


# each bad value, and the parameter its error must name
BAD = [
    ({"num_samples": 1}, "num_samples"),
    ({"sampler": {"cfg_scale": "x"}}, "cfg_scale"),
    ({"sampler": {"cfg_scle": 2}}, "cfg_scle"),
    ({"nodes": 0}, "nodes"),
    ({"gpus_per_node": -3}, "gpus_per_node"),
    ({"fid_threshold": math.nan}, "fid_threshold"),
    ({"pretrain_timeout_hours": 0.0}, "pretrain_timeout_hours"),
    ({"pretrain_overrides": ["--config=other.yaml"]}, "pretrain_overrides"),
    ({"tune_overrides": ["--help"]}, "tune_overrides"),
    ({"pretrain_overrides": ["data.uri=s3://elsewhere"]}, "pretrain_overrides"),
    ({"tune_overrides": ["init_from=models:/other@champion"]}, "tune_overrides"),
    ({"pretrain_overrides": ["optim.lr=fast"]}, "pretrain_overrides"),
    ({"tune_overrides": ["steps=010"]}, "tune_overrides"),
    ({"pretrain_config": "no_such_preset"}, "pretrain_config"),
    ({"nodes": 3}, "global_batch"),  # 1024 samples a step over 3 x 8 ranks
    ({"resolution": "high"}, "resolution"),
    ({"tune_init_from": "models:/m@champion", "pretrain_init_from": "x"}, "pretrain_init_from"),
]


def test_the_defaults_pass_and_every_bad_value_is_named():
    assert check_parameters(_defaults()).nodes == 1
    assert check_parameters({**_defaults(), "fid_threshold": math.inf, "nodes": 4}).nodes == 4
    for change, named in BAD:
        with pytest.raises(ParameterError if "overrides" in named else Exception, match=named) as caught:
            check_parameters({**_defaults(), **change})
        assert "Traceback" not in str(caught.value) and len(str(caught.value)) < 2000, change


def _invoke(*args):
    result = CliRunner().invoke(pipeline_app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def silent_host():
    """A host that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 0 3 * * 0"]])
def test_a_bad_parameter_is_refused_before_the_host_is_contacted(silent_host, command):
    host, accepted = silent_host
    for change, named in [(["-p", "num_samples=1"], "num_samples"), (["-p", "nodes=0"], "nodes"),
                          (["-p", "fid_threshold=nan"], "fid_threshold"),
                          (["-p", 'pretrain_overrides=["--config=other.yaml"]'], "pretrain_overrides"),
                          (["-p", "nodes=abc"], "nodes"), (["-p", "nodez=2"], "nodez")]:
        code, output = _invoke(*command, "--host", host, "--timeout", "1", *change)
        assert code == EXIT_USER_ERROR and named in output and "Traceback" not in output, output
    time.sleep(0.3)
    assert accepted == [], "the host was contacted"


def test_a_host_that_never_answers_times_out_in_one_line(silent_host):
    host, accepted = silent_host
    started = time.monotonic()
    code, output = _invoke("submit", "--host", host, "--timeout", "0.5")
    # kfp's health check is a GET (urllib3 retries a read timeout 3 times): 4 x 0.5 s and the connects
    assert time.monotonic() - started < 30 and accepted
    assert code == EXIT_USER_ERROR and "no answer within 0.5 s" in output and output.count("\n") == 1, output


def test_unreachable_hosts_are_one_line():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for host, said in [(closed, "cannot reach"), ("ftp://127.0.0.1:1", "not an http(s) URL"),
                       ("http://no-such-host.invalid:8080", "cannot reach")]:
        code, output = _invoke("submit", "--host", host, "--timeout", "1")
        assert code == EXIT_USER_ERROR and said in output and output.count("\n") == 1, (host, output)


def test_compile_sets_the_image_in_the_spec_and_refuses_what_is_not_an_image(tmp_path):
    good = "registry.example.com:5000/team/maskdit:1.0@sha256:" + "a" * 64
    path = compile_pipeline(tmp_path / "p.yaml", good)
    default = PIPELINE_YAML.read_text()
    changed = [(a, b) for a, b in zip(default.splitlines(), path.read_text().splitlines()) if a != b]
    assert changed and all(good in b for _, b in changed)  # only the image lines changed
    for bad in ["x\n        command: [evil]", "maskdit:1.0 --privileged", "Maskdit", "a//b", ""]:
        code, output = _invoke("compile", "--out", str(tmp_path / "q.yaml"), "--image", bad)
        assert code == EXIT_USER_ERROR and "is not an image reference" in output, (bad, output)
    code, output = _invoke("compile", "--out", str(tmp_path / "missing" / "deeper" / "p.yaml"))
    assert code == EXIT_USER_ERROR and "pass a writable --out" in output and output.count("\n") == 1, output


@pytest.mark.slow  # three step processes (about 20 s on 2 idle cores)
def test_the_dags_check_step_refuses_a_bad_parameter_before_any_work(tmp_path, capfd):
    """KFP's local runner: the check step fails on num_samples=1, naming it; the fingerprint step never starts."""
    from pipelines.cli import run_local

    with pytest.raises(RuntimeError, match="check-parameters"):
        run_local(dict(images="mnist", store_uri=str(tmp_path / "store"), resolution=32, pixel_space=True,
                       grayscale=True, pretrain_config="mnist_pretrain", tune_config="mnist_tune",
                       num_samples=1, ref_stats="", fid_threshold=1e6), tmp_path / "kfp")
    logs = "".join(capfd.readouterr())
    assert "num_samples" in logs and "greater than or equal to 2" in logs
    ran = {p.name for p in (tmp_path / "kfp").glob("*/*")}
    assert "fingerprint" not in ran and not (tmp_path / "store").exists(), ran
