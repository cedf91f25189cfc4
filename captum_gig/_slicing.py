"""Run only the part of a model between two layers (torch.fx).

If layer ``a`` is a *clean cut* -- everything the end point needs depends on
the model's inputs only through ``a``'s activation -- the model's traced graph
is sliced into a sub-network ``z -> activation of layer b`` (or the model
output), so attribution never re-runs the layers before ``a``. When the model
cannot be traced, ``a`` runs more than once, or a skip path crosses the cut,
:func:`slice_between` returns ``None`` and callers fall back to hooks on the
full forward.
"""

import operator
import weakref
from typing import Optional, Set

import torch.fx as fx
from torch import nn

from ._hooks import structure_key

__all__ = ["slice_between"]


class _Tracer(fx.Tracer):
    """Keeps the cut and end layers as single call_module nodes."""

    def __init__(self, keep: Set[str]):
        super().__init__()
        self.keep = keep

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.keep or super().is_leaf_module(m, qualname)


def _reads_input_batch_size(node: fx.Node) -> bool:
    """``inputs.size(0)`` or ``inputs.shape[0]`` of a model input."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        source = node.args[0]
        return dim == 0 and isinstance(source, fx.Node) and source.op == "placeholder"
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        shape = node.args[0]
        return (
            isinstance(shape, fx.Node)
            and shape.op == "call_function"
            and shape.target is getattr
            and shape.args[1] == "shape"
            and isinstance(shape.args[0], fx.Node)
            and shape.args[0].op == "placeholder"
        )
    return False


def slice_between(
    model: nn.Module, layer_a: str, layer_b: Optional[str], attribute_to_layer_input: bool = False
) -> Optional[fx.GraphModule]:
    """A module ``f(z)`` computing layer ``b``'s output (model output if None) from ``a``'s activation.

    ``z`` stands for ``a``'s output, or with ``attribute_to_layer_input`` for
    the first input of ``a``. Returns ``None`` where slicing is not possible.
    Slices are kept per model while its modules stay the same (tracing a
    ResNet50 costs more than a short attribution).
    """
    key = (layer_a, layer_b, attribute_to_layer_input, structure_key(model))
    try:
        cached = _CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable
        cached = {}
    if key not in cached:
        cached[key] = _trace_slice(model, layer_a, layer_b, attribute_to_layer_input)
    return cached[key]


#: traced slices per model (dropped with the model)
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _trace_slice(model: nn.Module, layer_a: str, layer_b: Optional[str],
                 attribute_to_layer_input: bool) -> Optional[fx.GraphModule]:
    keep = {layer_a} | ({layer_b} if layer_b else set())
    try:
        graph = _Tracer(keep).trace(model)
    except Exception:  # untraceable forward (data-dependent control flow, ...)
        return None
    a_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == layer_a]
    if len(a_nodes) != 1:
        return None
    node_a = a_nodes[0]
    if layer_b is None:
        end = next(n for n in graph.nodes if n.op == "output").args[0]
        if not isinstance(end, fx.Node):
            return None
    else:
        b_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == layer_b]
        if len(b_nodes) != 1:
            return None
        end = b_nodes[0]
    if attribute_to_layer_input and not (node_a.args and isinstance(node_a.args[0], fx.Node)):
        return None
    cut = node_a.args[0] if attribute_to_layer_input else node_a

    # nodes the end point needs, walking back from it; reaching a model input means a path around the cut
    needed: Set[fx.Node] = set()
    batch_size_reads: Set[fx.Node] = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        if node is cut and not attribute_to_layer_input:
            continue
        if _reads_input_batch_size(node):
            # e.g. ``x.view(inputs.size(0), -1)``: path points keep the batch axis, so read it from z
            batch_size_reads.add(node)
            needed.add(node)
            continue
        if node.op == "placeholder":
            return None
        needed.add(node)
        inputs = node.all_input_nodes
        if node is node_a and attribute_to_layer_input:
            inputs = [n for n in inputs if n is not cut]
        stack.extend(inputs)
    if attribute_to_layer_input and node_a not in needed:
        return None

    sub = fx.Graph()
    z = sub.placeholder("z")
    env = {} if attribute_to_layer_input else {node_a: z}
    for node in graph.nodes:
        if node not in needed:
            continue
        if node in batch_size_reads:
            env[node] = sub.call_method("size", (z, 0))
        elif attribute_to_layer_input and node is node_a:
            env[node] = sub.node_copy(node, lambda n: z if n is cut else env[n])
        else:
            env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(env[end])
    sub.lint()
    return fx.GraphModule(model, sub, class_name=f"{type(model).__name__}Slice")
