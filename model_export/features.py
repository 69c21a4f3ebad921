"""The last hidden layer (fc7 after its ReLU) as a second output of an exported crops-kind graph:
an image's feature vector (the paper's Figure 4) from the same inference call as its logits.

Done on the ONNX graph rather than by exporting a torch wrapper: the tensor already exists in the
exported graph (fc8's input; dropout is gone in eval mode), so exposing it adds no node and no
computation, and the export itself stays as it is. Output per crop, (N*10, 4096); the service
averages an image's ten crops ("ten-crop mean", as for the probabilities).
"""

import onnx

from alexnet_core.metadata import ModelMetadata

FEATURES_NAME = "features"


class FeaturesError(ValueError):
    pass


def fc7_tensor(graph: onnx.GraphProto, output_name: str) -> str:
    """The name of fc7's ReLU output: the input of the Gemm that produces the logits (fc8)."""
    producers = {out: node for node in graph.node for out in node.output}
    fc8 = producers.get(output_name)
    if fc8 is None or fc8.op_type not in ("Gemm", "MatMul"):
        raise FeaturesError(f"the output {output_name!r} is not made by a fully connected layer (fc8)")
    relu = producers.get(fc8.input[0])
    if relu is None or relu.op_type != "Relu":
        raise FeaturesError("fc8's input is not a ReLU output (fc7 after ReLU)")
    return relu.output[0]


def add_features_output(proto: onnx.ModelProto, metadata: ModelMetadata) -> ModelMetadata:
    """Expose fc7-after-ReLU as ``features`` (per crop) in ``proto``, in place, and record it in
    the metadata props; returns the updated metadata."""
    graph = proto.graph
    if metadata.input_kind != "crops":
        raise FeaturesError("only the crops kind gets its features here (the square kind has its own)")
    if any(o.name == FEATURES_NAME for o in graph.output):
        raise FeaturesError(f"the graph already has an output {FEATURES_NAME!r}")
    source = fc7_tensor(graph, metadata.output_name)
    # An Identity gives the output its contract name without renaming the tensor inside the graph.
    graph.node.append(onnx.helper.make_node("Identity", [source], [FEATURES_NAME], name="features_identity"))
    graph.output.append(
        onnx.helper.make_tensor_value_info(FEATURES_NAME, onnx.TensorProto.FLOAT, ["crops", 4096])
    )
    metadata = metadata.model_copy(update={"features_output": FEATURES_NAME})
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata.to_props())
    return metadata
