"""Feature vectors (fc7 after ReLU, 4096-d) of uploaded images, from the model's second output.

One inference call gives both outputs, so /similar ranks classes and neighbours from one pass.
The choice everywhere: the **ten-crop mean**, the same crops the probabilities average (the five
without mirrors for a model trained without flips: ``ModelMetadata.test_crops``). The crops kind
outputs features per crop (N*crops, 4096), averaged here; the square kind averages in its graph
and outputs (N, 4096) already.
"""

from dataclasses import dataclass

import numpy as np

from alexnet_core.pipeline import N_CROPS, probabilities
from alexnet_core.session import OnnxClassifier

AGGREGATION = "ten-crop mean"
FIVE_CROP_AGGREGATION = "five-crop mean (no mirrors)"


class NoFeatures(LookupError):
    """The model in service was exported without a features output."""


@dataclass(frozen=True)
class Embedded:
    features: np.ndarray  # (n, dim) float32
    probabilities: np.ndarray  # (n, classes)


def aggregation(classifier: OnnxClassifier) -> str:
    """How an image's crops make its vector (and probabilities), for the model in service."""
    return AGGREGATION if classifier.metadata.test_crops == N_CROPS else FIVE_CROP_AGGREGATION


def features_name(classifier: OnnxClassifier) -> str:
    name = classifier.metadata.features_output
    if not name:
        raise NoFeatures(
            f"model {classifier.version!r} has no features output: export it with "
            "`alexnet-export --features` (or as the square kind) and activate it"
        )
    return name


def feature_dim(classifier: OnnxClassifier) -> int:
    name = features_name(classifier)
    shape = next(o.shape for o in classifier.session.get_outputs() if o.name == name)
    return shape[-1] if isinstance(shape[-1], int) else 4096  # fc7's width where not stated


def embed(classifier: OnnxClassifier, inputs: list[np.ndarray]) -> Embedded:
    """One inference call for all images; both outputs."""
    meta = classifier.metadata
    name = features_name(classifier)
    scores, features = classifier.session.run(
        [meta.output_name, name], {meta.input_name: np.concatenate(inputs)}
    )
    if meta.input_kind == "square":  # probabilities and features already per image
        return Embedded(np.asarray(features, np.float32), np.asarray(scores))
    crops = meta.test_crops
    per_image = features.reshape(len(inputs), crops, -1).mean(axis=1, dtype=np.float64)
    return Embedded(per_image.astype(np.float32), probabilities(scores, crops))
