"""The contract both stages share, with neither torch nor FastAPI.

- ``metadata``: what an exported model file says about itself (labels, sizes, normalisation).
- ``images``: bytes -> upright RGB image (format sniffing, limits, EXIF, modes).
- ``pipeline``: image -> square -> ten crops (five for a model trained without flips), and
  probabilities -> top-k.
- ``session``: one ONNX Runtime session around one model file.
- ``files``: atomic writes and file hashes.

``model_export`` (training, export) and ``service`` (HTTP) both import from here, so that a model
is validated with exactly the pipeline it is served with.
"""
