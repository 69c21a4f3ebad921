"""Feature vectors (fc7 after ReLU, 4096-d) of uploaded images, from the model's second output
(``OnnxClassifier.outputs``, run by the batcher like every inference).

One inference call gives both outputs, so /similar ranks classes and neighbours from one pass.
The choice everywhere: the **ten-crop mean**, the same crops the probabilities average (the five
without mirrors for a model trained without flips: ``ModelMetadata.test_crops``). The crops kind
outputs features per crop (N*crops, 4096), averaged in ``OnnxClassifier.outputs``; the square
kind averages in its graph and outputs (N, 4096) already.
"""

from alexnet_core.pipeline import N_CROPS
from alexnet_core.session import OnnxClassifier

AGGREGATION = "ten-crop mean"
FIVE_CROP_AGGREGATION = "five-crop mean (no mirrors)"


class NoFeatures(LookupError):
    """The model in service was exported without a features output."""


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
    if (known := getattr(classifier, "feature_width", None)) is not None:  # a view without a session
        return known
    shape = next(o.shape for o in classifier.session.get_outputs() if o.name == name)
    return shape[-1] if isinstance(shape[-1], int) else 4096  # fc7's width where not stated
