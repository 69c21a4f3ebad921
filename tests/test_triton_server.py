"""The repository ``alexnet-export --triton`` writes, loaded by a real Triton Inference Server.

The server is the ``tritonserver`` (r24.10) that the ``nvidia-pytriton`` wheel ships. Its only
backend is ``python``, so the config as exported gets one change, the backend line (python instead
of onnxruntime, running deploy/triton/model.py: ONNX Runtime on the same model.onnx); everything
else (inputs, outputs, label file, dynamic batching, instance group, parameters) is parsed and
applied by Triton itself. Checked through ``tritonclient``: the config as Triton read it, outputs
equal to ONNX Runtime in-process, batching, and labels through the classification extension;
and the same client code against the service's Open Inference Protocol.

The python backend's stub needs numpy < 2, which this project's environment does not have: the
server runs from its own virtual environment, named by ALEXNET_TRITON_ENV (made with
``python3.11 -m venv ENV && ENV/bin/pip install nvidia-pytriton "numpy<2" onnxruntime``). Skipped
without it.
"""

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from alexnet_core.images import decode
from alexnet_core.pipeline import center_square
from alexnet_core.session import OnnxClassifier
from benchmarks.server import stop_process, wait_for_200
from model_export.triton import write_triton_repository
from tests.conftest import cpu_settings, free_port, serve
from tests.images import photo_jpeg

httpclient = pytest.importorskip("tritonclient.http", reason="pip install tritonclient geventhttpclient")

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ.get("ALEXNET_TRITON_ENV")
pytestmark = pytest.mark.skipif(
    not ENV,
    reason="no Triton server: set ALEXNET_TRITON_ENV to a venv with nvidia-pytriton, numpy<2 and onnxruntime",
)


def triton_environment(env: Path) -> tuple[Path, Path, str]:
    """(pytriton's tritonserver folder, its bundled libraries, the env's python version)."""
    probe = (
        "import sys, pytriton, numpy; print(pytriton.__file__); "
        "print('%d.%d' % sys.version_info[:2]); print(numpy.__version__)"
    )
    out = subprocess.run(
        [str(env / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"{env} has no usable nvidia-pytriton: {out.stderr}"
    module, version, numpy_version = out.stdout.split()
    assert int(numpy_version.split(".")[0]) < 2, (
        f"the python backend's stub needs numpy < 2, {env} has {numpy_version}"
    )
    package = Path(module).parent
    return package / "tritonserver", package.parent / "nvidia_pytriton.libs", version


def python_backend_repository(model_dir: Path, repo: Path) -> OnnxClassifier:
    """The exported repository (CPU instances), its backend line switched to python."""
    (model,) = model_dir.glob("*.onnx")
    classifier = OnnxClassifier(model, ["CPUExecutionProvider"], warm_up=False)
    config = write_triton_repository(model, classifier.metadata, repo, instance_kind="KIND_CPU")
    text = config.read_text()
    assert 'backend: "onnxruntime"' in text
    lines = [line for line in text.splitlines() if not line.startswith("default_model_filename")]
    config.write_text("\n".join(lines).replace('backend: "onnxruntime"', 'backend: "python"') + "\n")
    shutil.copy(ROOT / "deploy" / "triton" / "model.py", config.parent / "1" / "model.py")
    return classifier


@pytest.fixture(scope="module")
def triton(
    imagenet_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, OnnxClassifier, Path]]:
    assert ENV
    env = Path(ENV)
    dist, libs, version = triton_environment(env)
    work = tmp_path_factory.mktemp("triton")
    classifier = python_backend_repository(imagenet_model_dir, work / "repo")
    # As pytriton itself launches it: the server folder with the stub of the env's python.
    server = work / "server"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    shutil.copy(stub, server / "backends" / "python" / "triton_python_backend_stub")
    port = free_port()
    command = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={work / 'repo'}",
        f"--backend-directory={server / 'backends'}",
        "--http-address=127.0.0.1",
        f"--http-port={port}",
        "--allow-grpc=false",
        "--allow-metrics=false",
        "--strict-model-config=true",
    ]
    environ = {
        **os.environ,
        "PATH": f"{env / 'bin'}:{os.environ['PATH']}",  # the stub's python: the env's
        "LD_LIBRARY_PATH": str(libs),
    }
    log = work / "tritonserver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=environ, stdout=out, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    try:
        wait_for_200(process, f"http://{url}/v2/health/ready", log, timeout_s=180, what="tritonserver")
        yield url, classifier, work / "repo"
    finally:
        stop_process(process)


def model_input(metadata: dict[str, Any], classifier: OnnxClassifier, image: bytes) -> np.ndarray:
    """One image as the model's input tensor, by what the server's metadata declares: ten
    normalised crops (FP32), or the central square (UINT8, a model of the square kind)."""
    (tensor,) = [i for i in metadata["inputs"] if i["datatype"] != "BYTES"]
    meta = classifier.metadata
    if tensor["datatype"] == "UINT8":
        array = center_square(decode(image, meta.resize_size, 10**8), meta.resize_size)[None]
    else:
        array = meta.preprocess(image, max_pixels=10**8).crops
    assert tensor["shape"][1:] == list(array.shape[1:]), tensor
    return array


def top_classes(client: Any, image_input: np.ndarray, k: int) -> tuple[str, np.ndarray, list[list[str]]]:
    """The same client code for Triton and the service: the model's input and first output by its
    metadata; the output, and its top k through the classification extension."""
    metadata = client.get_model_metadata("alexnet")
    (tensor,) = [i for i in metadata["inputs"] if i["datatype"] != "BYTES"]
    output = metadata["outputs"][0]["name"]
    request = httpclient.InferInput(tensor["name"], list(image_input.shape), tensor["datatype"])
    request.set_data_from_numpy(image_input)
    values = client.infer("alexnet", [request]).as_numpy(output)
    ranked = client.infer(
        "alexnet", [request], outputs=[httpclient.InferRequestedOutput(output, class_count=k)]
    ).as_numpy(output)
    return output, values, [[item.decode() for item in row] for row in ranked]


def test_config_as_triton_parsed_it(triton: tuple[str, OnnxClassifier, Path]) -> None:
    """What Triton read (its model-configuration endpoint) is what the export wrote."""
    url, classifier, repo = triton
    client = httpclient.InferenceServerClient(url)
    config = client.get_model_config("alexnet")
    written = (repo / "alexnet" / "config.pbtxt").read_text()
    assert config["backend"] == "python"
    assert f"max_batch_size: {config['max_batch_size']}\n" in written
    preferred = ", ".join(map(str, config["dynamic_batching"]["preferred_batch_size"]))
    assert f"preferred_batch_size: [ {preferred} ]" in written
    assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", 1)]
    assert config["output"][0]["label_filename"] == "labels.txt"
    assert config["parameters"]["alexnet_version"]["string_value"] == classifier.version
    (tensor,) = client.get_model_metadata("alexnet")["inputs"]
    assert [str(d) for d in config["input"][0]["dims"]] == [str(d) for d in tensor["shape"][1:]]


def test_outputs_and_labels_match_onnx_runtime(triton: tuple[str, OnnxClassifier, Path]) -> None:
    url, classifier, repo = triton
    client = httpclient.InferenceServerClient(url)
    crops = model_input(client.get_model_metadata("alexnet"), classifier, photo_jpeg())
    name, values, ranked = top_classes(client, crops, k=3)
    session = ort.InferenceSession(
        str(repo / "alexnet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = session.run([name], {classifier.metadata.input_name: crops})[0]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    labels = (repo / "alexnet" / "labels.txt").read_text().splitlines()
    assert labels == classifier.metadata.labels
    for row, ranks in zip(expected, ranked, strict=True):
        indices = [int(item.split(":", 2)[1]) for item in ranks]
        assert indices == list(np.argsort(-row, kind="stable")[:3])
        assert [item.split(":", 2)[2] for item in ranks] == [labels[i] for i in indices]


def test_dynamic_batching(triton: tuple[str, OnnxClassifier, Path]) -> None:
    """Concurrent requests run in fewer executions than requests (Triton's statistics)."""
    url, classifier, _ = triton
    client = httpclient.InferenceServerClient(url, concurrency=8)
    metadata = client.get_model_metadata("alexnet")
    array = model_input(metadata, classifier, photo_jpeg())
    (tensor,), output = metadata["inputs"], metadata["outputs"][0]
    request = httpclient.InferInput(tensor["name"], list(array.shape), tensor["datatype"])
    request.set_data_from_numpy(array)

    def counts() -> tuple[int, int]:
        stats = client.get_inference_statistics("alexnet")["model_stats"][0]
        return stats["inference_count"], stats["execution_count"]

    before = counts()
    pending = [client.async_infer("alexnet", [request]) for _ in range(8)]
    shape = (len(array), output["shape"][-1])
    assert all(p.get_result().as_numpy(output["name"]).shape == shape for p in pending)
    after = counts()
    assert after[0] - before[0] == 8 * len(array)  # inference_count counts batch rows
    assert after[1] - before[1] < 8, f"no request was batched with another: {before} -> {after}"


def test_same_client_for_the_service(
    triton: tuple[str, OnnxClassifier, Path], imagenet_model_dir: Path
) -> None:
    """top_classes, unchanged, against the service: its output is per image (the ten crops
    averaged), Triton's per crop; both rank by the same model."""
    with serve(cpu_settings(imagenet_model_dir)) as base:
        client = httpclient.InferenceServerClient(base.removeprefix("http://"))
        classifier = triton[1]
        crops = model_input(client.get_model_metadata("alexnet"), classifier, photo_jpeg())
        name, values, ranked = top_classes(client, crops, k=3)
        assert name == "probabilities" and values.shape == (1, 1000)
        np.testing.assert_allclose(values, classifier.probabilities(crops), rtol=1e-5, atol=1e-7)
        predicted = httpx.post(
            f"{base}/predict", params={"top_k": 3}, files={"file": ("a.jpg", photo_jpeg())}
        )
        top = predicted.json()["results"][0]["predictions"]
        assert [int(item.split(":", 2)[1]) for item in ranked[0]] == [p["index"] for p in top]
        client.close()
