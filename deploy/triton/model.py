"""Triton python-backend model: the exported ONNX file run by ONNX Runtime, behind the config
that ``alexnet-export --triton`` writes (its backend line swapped to "python").

For Triton builds that ship only the python backend (the ``tritonserver`` inside the
``nvidia-pytriton`` wheel): production uses Triton's own onnxruntime backend with the config as
written. Place as ``<repo>/<model>/<version>/model.py`` next to ``model.onnx``. Requests that the
dynamic batcher gathers run as one ONNX Runtime call, as the onnxruntime backend would run them.
"""

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by Triton's python backend


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.input = config["input"][0]["name"]
        self.outputs = [output["name"] for output in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        inputs = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        results = self.session.run(self.outputs, {self.input: np.concatenate(inputs)})
        responses, offset = [], 0
        for batch in inputs:
            rows = slice(offset, offset + len(batch))
            offset += len(batch)
            tensors = [
                pb_utils.Tensor(name, result[rows])
                for name, result in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
