"""Reading an exported ONNX file back without wszoo's model: the metadata :func:`wszoo.export` stored in it, and
whether its graph is inference-clean (nothing standardized or normalized at run time from the weights)."""
import json
from typing import Any, Dict, List

__all__ = ["onnx_metadata", "inference_problems"]


def onnx_metadata(path: str) -> Dict[str, Any]:
    """The wszoo metadata stored in an exported ONNX file's ``metadata_props`` (values JSON-decoded)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return {k[len("wszoo."):]: json.loads(v) for k, v in props.items() if k.startswith("wszoo.")}


# what standardizing a weight inside the graph looks like: statistics and normalization ops
_WEIGHT_STATISTICS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt", "Pow", "Div", "Sub",
                      "BatchNormalization", "InstanceNormalization", "LayerNormalization", "Reciprocal"}


def inference_problems(path: str) -> List[str]:
    """Why an exported ONNX graph is not inference-clean: a training-mode BatchNormalization, or statistics
    computed from the weights themselves (what an unfolded WS layer would export: mean/variance/sqrt of an
    initializer) instead of weights stored ready to use."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    from_weights = {i.name for i in graph.initializer}
    constants = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    problems = []
    for node in graph.node:
        if node.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in node.attribute):
            problems.append(f"{node.name}: training-mode BatchNormalization")
        inputs = [i for i in node.input if i]
        if inputs and any(i in from_weights for i in inputs) and all(i in from_weights or i in constants
                                                                      for i in inputs):
            from_weights.update(node.output)  # a function of the weights alone
            if node.op_type in _WEIGHT_STATISTICS:
                problems.append(f"{node.name}: {node.op_type} computed on the weights")
    return problems
