"""The command lines: ``alexnet-export`` and ``alexnet-train`` read ALEXNET_WEIGHTS_DIR, take no
abbreviated options, and default to the one layout; ``alexnet-train``'s options are the
training configuration's fields, the same ones ``POST /train`` takes."""

import json
from pathlib import Path

import pytest

from alexnet_core.metadata import ModelMetadata
from alexnet_core.session import OnnxClassifier
from alexnet_core.training import DEFAULT_LAYOUT, TrainConfig, TrainRun
from model_export import cli, options
from model_export import train as train_cli
from service.schemas import TrainRequest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # an abbreviation of --output: refused, and no file named "outdir" written
        (["--source", "random", "--out", "outdir"], "unrecognized arguments: --out outdir"),
        (["--source", "random", "--output", "model"], "'model' does not end in .onnx"),
    ],
    ids=["abbreviated-option", "output-not-onnx"],
)
def test_export_refuses_bad_output_options(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_writes_into_alexnet_weights_dir_in_the_default_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "from-env"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALEXNET_WEIGHTS_DIR", str(weights))
    assert cli.main(["--source", "random", "--seed", "1"]) == 0
    (model,) = weights.glob("*.onnx")
    assert not (tmp_path / "weights").exists()
    meta: ModelMetadata = OnnxClassifier(model, ["CPUExecutionProvider"], warm_up=False).metadata
    assert meta.layout == DEFAULT_LAYOUT == "torchvision" and meta.source == "random:seed=1"


def test_train_options_are_the_configurations_fields() -> None:
    actions = {a.dest: a for a in train_cli.parser()._actions}
    assert set(TrainRun.model_fields) <= set(actions)  # a new field is a new option, nothing else
    flags = {name: actions[name].option_strings for name in TrainRun.model_fields}
    # The names users have.
    for name, flag in [
        ("epochs", "--epochs"),
        ("batch_size", "--batch-size"),
        ("target_top1", "--stop-at-top1"),
        ("flip", "--no-flip"),
        ("export", "--no-export"),
        ("progress", "--no-progress"),
        ("lr_schedule", "--lr-schedule"),
        ("weights_dir", "--weights-dir"),
        ("out", "--out"),
    ]:
        assert flag in flags[name], (name, flags[name])
    # ... and every parameter a run takes is one POST /train takes too.
    assert set(TrainConfig.model_fields) <= set(TrainRequest.model_json_schema()["properties"])


def test_train_command_line_is_validated_by_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ALEXNET_WEIGHTS_DIR", str(tmp_path / "from-env"))
    config = options.parse([str(tmp_path / "data"), "--no-flip", "--stop-at-top1", "0.9"], train_cli.parser())
    assert config.weights_dir == tmp_path / "from-env"
    assert not config.flip and config.target_top1 == 0.9 and config.epochs == 90
    assert config.layout == DEFAULT_LAYOUT == TrainRequest(dataset="d").layout
    assert config.resize == 256 and config.model_copy(update={"input_size": 64}).resize == 73
    for argv, message in [
        (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no abbreviations
        (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1"),
        (["--layout", "vgg"], "invalid choice: 'vgg'"),
    ]:
        with pytest.raises(SystemExit) as exited:
            options.parse([str(tmp_path / "data"), *argv], train_cli.parser())
        assert exited.value.code == 2 and message in capsys.readouterr().err, argv


def test_a_jobs_config_file_is_what_the_trainer_runs(tmp_path: Path) -> None:
    request = TrainRequest(dataset="digits", epochs=3, flip=False, lr_schedule="0:0.01,2:0.001")
    written = TrainRun.model_validate(
        request.model_dump(include=set(TrainConfig.model_fields))
        | {"data": tmp_path, "out": tmp_path / "run"}
    )
    path = tmp_path / "config.json"
    path.write_text(written.model_dump_json())
    read = options.parse(["--config", str(path)], train_cli.parser())
    assert read == written
    assert options.parse(["--config", str(path), "--epochs", "5"], train_cli.parser()).epochs == 5
    assert json.loads(path.read_text())["target_top1"] is None
