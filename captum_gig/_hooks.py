"""The one place that touches forward hooks and model state.

Every hook registered here is removed on exit of its context manager, also
when the forward raises; :func:`frozen` restores the model's train/eval mode
and the ``requires_grad`` flags of its parameters.
"""

import difflib
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import all_finite

LayerSpec = Union[str, nn.Module]

__all__ = [
    "resolve_layer",
    "frozen",
    "Tap",
    "tap",
    "replace",
    "StopForward",
    "run_until",
    "model_device",
    "check_runs_once",
    "check_inputs",
    "trace_layers",
]


def resolve_layer(model: nn.Module, layer: LayerSpec, argument: str = "layer") -> Tuple[str, nn.Module]:
    """Return ``(dotted name, module)`` for a module of ``model`` or its dotted name."""
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer in modules and layer != "":
            return layer, modules[layer]
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{argument}={layer!r} is not a submodule of the model{hint}")
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer and name != "":
                return name, module
        raise ValueError(
            f"{argument} is a module that is not a submodule of the model "
            f"({type(layer).__name__}); pass one of model.named_modules() or its dotted name"
        )
    raise TypeError(f"{argument} must be an nn.Module or a dotted module name, got {type(layer).__name__}")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def frozen(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with parameters not requiring grad; restore both on exit.

    Gradients are only ever taken with respect to activations, and skipping the
    parameter gradients makes the backward passes markedly cheaper.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _single_tensor(value, name: str, where: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    raise TypeError(
        f"layer {name!r} {where} a {type(value).__name__}, not a single tensor; "
        "hook a module whose output is one activation tensor"
    )


class Tap:
    """Records the activation of one layer during a forward pass.

    Values are cloned: a following in-place op (``ReLU(inplace=True)``) would
    otherwise overwrite what was recorded.
    """

    def __init__(self, name: str, attribute_to_layer_input: bool):
        self.name = name
        self.attribute_to_layer_input = attribute_to_layer_input
        self.values: List[Tensor] = []

    @property
    def value(self) -> Tensor:
        if not self.values:
            raise RuntimeError(
                f"layer {self.name!r} was not run by the model's forward; is it part of the forward path?"
            )
        if len(self.values) > 1:
            raise ValueError(
                f"layer {self.name!r} ran {len(self.values)} times in one forward pass (a reused module, "
                "e.g. a shared activation); its activation is ambiguous, hook a module that runs once"
            )
        return self.values[0]


@contextmanager
def tap(model: nn.Module, layer: LayerSpec, attribute_to_layer_input: bool = False) -> Iterator[Tap]:
    """Capture a layer's output (or its first input) for every forward run inside the block."""
    name, module = resolve_layer(model, layer)
    record = Tap(name, attribute_to_layer_input)
    if attribute_to_layer_input:

        def pre_hook(_m, args):
            record.values.append(_single_tensor(args[0] if args else None, name, "receives").clone())

        handle = module.register_forward_pre_hook(pre_hook)
    else:

        def hook(_m, _args, output):
            record.values.append(_single_tensor(output, name, "returns").clone())

        handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@contextmanager
def replace(
    model: nn.Module,
    layer: LayerSpec,
    replacement: Callable[[Tensor], Tensor],
    attribute_to_layer_input: bool = False,
) -> Iterator[None]:
    """Replace a layer's output (or its first input) by ``replacement(original)``.

    The replacement is cloned so that in-place ops after the layer cannot write
    into a tensor the caller holds (e.g. a path point that requires grad).
    """
    name, module = resolve_layer(model, layer)
    calls = [0]

    def count():
        calls[0] += 1
        if calls[0] > 1:
            raise ValueError(f"layer {name!r} ran more than once in one forward pass; cannot replace its activation")

    if attribute_to_layer_input:

        def pre_hook(_m, args):
            count()
            new = replacement(_single_tensor(args[0] if args else None, name, "receives"))
            return (new.clone(),) + tuple(args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    else:

        def hook(_m, _args, output):
            count()
            return replacement(_single_tensor(output, name, "returns")).clone()

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised from a hook to end a forward pass early, carrying the activation."""

    def __init__(self, value: Tensor):
        super().__init__("forward stopped at the target layer")
        self.value = value


def run_until(
    model: nn.Module,
    layer: Optional[LayerSpec],
    inputs,
    additional_forward_args: Optional[tuple] = None,
    attribute_to_layer_input: bool = False,
) -> Tensor:
    """Run ``model`` and return ``layer``'s activation, skipping the rest of the forward.

    With ``layer=None`` return the model output.
    """
    args = (inputs,) + tuple(additional_forward_args or ())
    if layer is None:
        return model(*args)
    name, module = resolve_layer(model, layer)

    def stop(value, where):
        raise StopForward(_single_tensor(value, name, where))

    if attribute_to_layer_input:
        handle = module.register_forward_pre_hook(lambda _m, a: stop(a[0] if a else None, "receives"))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: stop(out, "returns"))
    try:
        model(*args)
    except StopForward as stopped:
        return stopped.value
    finally:
        handle.remove()
    raise RuntimeError(f"layer {name!r} was not run by the model's forward; is it part of the forward path?")


def check_runs_once(model: nn.Module, layer: LayerSpec, inputs, additional_forward_args: Optional[tuple] = None,
                    attribute_to_layer_input: bool = False) -> Tensor:
    """Run the full forward once and return ``layer``'s activation, refusing a layer that runs twice.

    :func:`run_until` stops at a layer's first call and so cannot see a second
    one (a reused activation module, a block applied twice); call this once on
    a first batch before relying on it.
    """
    name, _ = resolve_layer(model, layer)
    key = (name, attribute_to_layer_input, structure_key(model))
    try:
        checked = _RUNS_ONCE.setdefault(model, set())
    except TypeError:  # not weak-referenceable: check every time
        checked = set()
    if key in checked:  # the same modules ran this layer once before: the cheaper early stop will do
        return run_until(model, layer, inputs, additional_forward_args, attribute_to_layer_input)
    args = (inputs,) + tuple(additional_forward_args or ())
    with tap(model, layer, attribute_to_layer_input) as record:
        model(*args)
    value = record.value  # raises for zero or several calls
    checked.add(key)
    return value


def ensure_runs_once(model: nn.Module, layer: LayerSpec, inputs, additional_forward_args: Optional[tuple] = None,
                     attribute_to_layer_input: bool = False) -> None:
    """:func:`check_runs_once` unless this layer of these modules was checked before (then no forward)."""
    name, _ = resolve_layer(model, layer)
    try:
        checked = _RUNS_ONCE.get(model, set())
    except TypeError:
        checked = set()
    if (name, attribute_to_layer_input, structure_key(model)) not in checked:
        check_runs_once(model, layer, inputs, additional_forward_args, attribute_to_layer_input)


def structure_key(model: nn.Module) -> tuple:
    """The model's module tree (names and types): what a traced slice or a checked layer depends on."""
    return tuple((name, type(m)) for name, m in model.named_modules())


#: layers found to run once per forward, per model (dropped with the model)
_RUNS_ONCE: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def check_inputs(model: nn.Module, inputs, argument: str = "inputs") -> None:
    """Refuse inputs on another device than the model, of another float dtype, or with NaN/inf."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{argument} must be a tensor; got {type(inputs).__name__}")
    device = model_device(model)
    if inputs.device != device:
        raise ValueError(f"{argument} are on {inputs.device} but the model is on {device}; move one of them")
    params = [p for p in model.parameters() if p.is_floating_point()]
    if inputs.is_floating_point() and params and inputs.dtype != params[0].dtype:
        raise TypeError(f"{argument} are {inputs.dtype} but the model's parameters are {params[0].dtype}")
    if not all_finite(inputs):
        raise ValueError(f"{argument} contain NaN or inf")


def trace_layers(model: nn.Module, inputs, additional_forward_args: Optional[tuple] = None) -> List[Tuple[str, str, Optional[Tuple[int, ...]], int]]:
    """Run one forward and report every submodule: ``(name, type, output shape or None, calls)``.

    A module with ``calls != 1`` (reused, or not on the forward path) cannot be
    hooked unambiguously; the output shape is None when it is not one tensor.
    """
    seen = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _args, output, name=name):
            shape = tuple(output.shape) if isinstance(output, Tensor) else None
            prev = seen.get(name)
            seen[name] = (shape, (prev[1] if prev else 0) + 1)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*((inputs,) + tuple(additional_forward_args or ())))
    finally:
        for h in handles:
            h.remove()
    return [
        (name, type(module).__name__, seen.get(name, (None, 0))[0], seen.get(name, (None, 0))[1])
        for name, module in model.named_modules()
        if name
    ]
