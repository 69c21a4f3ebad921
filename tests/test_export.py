from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import model_export.export as export_module
from alexnet_core.metadata import ModelMetadata
from model_export.alexnet import AlexNet
from model_export.cli import main as export_cli
from model_export.export import ExportError, export_onnx
from model_export.weights import random_weights


def read_metadata(path: Path) -> ModelMetadata:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)


@pytest.mark.parametrize("layout", ["paper", "torchvision"])
def test_cli_exports_one_self_describing_file(
    layout: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "model.onnx"
    assert (
        export_cli(["--source", "random", "--layout", layout, "--input", "crops", "--output", str(out)]) == 0
    )
    # no external-data side file; the SHA-256 manifest the service checks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.sha256"]
    printed = capsys.readouterr().out
    assert "parity" in printed and "UNTRAINED" in printed

    proto = onnx.load(str(out), load_external_data=False)
    assert all(not t.external_data for t in proto.graph.initializer)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch

    meta = read_metadata(out)
    assert meta.layout == layout and not meta.trained and meta.source == "random:seed=0"
    assert len(meta.labels) == 1000 and len(meta.wnids) == 1000
    assert meta.labels[281] == "tabby" and meta.labels[967] == "espresso"
    assert meta.wnids[281] == "n02123045"
    assert (meta.input_size, meta.resize_size) == (224, 256)
    assert meta.mean == [0.485, 0.456, 0.406] and meta.std == [0.229, 0.224, 0.225]
    assert meta.version == "model" and meta.exported_at is not None

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        assert session.run(None, {"images": x})[0].shape == (batch, 1000)


def test_parity_with_torch(tmp_path: Path) -> None:
    weights = random_weights("paper", seed=3)
    result = export_onnx(weights, tmp_path / "m.onnx", input_kind="crops")
    assert result.max_abs_diff <= 1e-4
    # Independent check on other data than the exporter's own.
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = weights.model.eval()(x).numpy()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], expected, atol=1e-4)


def test_torchvision_state_dict_exports_through_cli(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = AlexNet("torchvision").state_dict()
    checkpoint = tmp_path / "tv.pth"
    torch.save(state, checkpoint)
    weights_dir = tmp_path / "weights"
    assert (
        export_cli(
            ["--source", "checkpoint", "--checkpoint", str(checkpoint), "--weights-dir", str(weights_dir)]
        )
        == 0
    )
    (model,) = weights_dir.glob("*.onnx")
    meta = read_metadata(model)
    # The default kind: uint8 central squares in, the ten-crop probabilities and features out.
    assert (meta.input_kind, meta.output_name, meta.features_output) == (
        "square",
        "probabilities",
        "features",
    )
    assert meta.version == model.stem and meta.version.startswith("alexnet-torchvision-checkpoint-")
    assert meta.trained and meta.source_sha256 is not None and meta.labels[967] == "espresso"


def test_wrong_state_dict_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "paper.pth"
    torch.save(AlexNet("paper").state_dict(), checkpoint)
    code = export_cli(
        [
            "--source",
            "checkpoint",
            "--checkpoint",
            str(checkpoint),
            "--layout",
            "torchvision",
            "--weights-dir",
            str(tmp_path / "w"),
        ]
    )
    assert code == 1
    assert "wrong shapes" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").iterdir())


def test_failed_parity_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # no export can meet this
    with pytest.raises(ExportError, match="disagree"):
        export_onnx(random_weights("torchvision"), tmp_path / "m.onnx", input_kind="crops")
    assert list(tmp_path.iterdir()) == []


def test_pretrained_offline_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = export_cli(
        ["--source", "pretrained", "--weights-dir", str(tmp_path), "--url", "http://127.0.0.1:9/x.pth"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth" in err and "alexnet-train" in err
    assert list(tmp_path.iterdir()) == []
