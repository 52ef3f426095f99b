"""Whole-state checkpoints of components, without per-component code.

A component (a continual-learning model, a plasticity method, a buffer policy) keeps its state in its
attributes: tensors, numbers, lists and dicts of them, extra networks, optimizers, generators, objects
with their own `state_dict`. `capture` walks the attributes and turns them into what
`torch.load(..., weights_only=True)` reads back (tensors, numbers, strings, lists, dicts); `restore`
puts each value back into the live component. An attribute whose type it does not know ends the
save with one sentence naming it, so no state is silently left out.

Attributes that are not state but references to objects the framework owns and rebuilds (the
dataset, the arguments, the network given to a plasticity method) are named in the component's
`REFERENCES`; tensors that are parameters or buffers of the component's own networks are saved as
references to them by name, so a list of the network's parameters is restored as the same list.
"""
from __future__ import annotations

import argparse
import functools
import random
import types
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.errors import ConfigError

# Markers of encoded values: a dict with one of these keys is not a plain dict.
_KINDS = ("__ndarray__", "__tuple__", "__set__", "__generator__", "__np_generator__", "__random__",
          "__state__", "__optimizer__", "__tensor_ref__", "__device__", "__dict__")


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # what nn.Module keeps in every instance's __dict__
_CODE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial, type)


class StateError(ConfigError):
    """A component holds something a checkpoint cannot save or restore."""


def _owner_name(obj: Any) -> str:
    return getattr(obj, "NAME", None) or type(obj).__name__


def _named_tensors(modules: dict[str, nn.Module]):
    """(qualified name, tensor) of every parameter and buffer of the given modules."""
    for prefix, module in modules.items():
        for name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(
                module.named_buffers(remove_duplicate=False)):
            yield (f"{prefix}.{name}" if prefix else name), tensor


def _tensor_names(modules: dict[str, nn.Module]) -> dict[int, str]:
    """id of every parameter and buffer of the given modules → its qualified name (the first one)."""
    names = {}
    for name, tensor in _named_tensors(modules):
        names.setdefault(id(tensor), name)
    return names


def _encode(value: Any, where: str, refs: dict[int, str]) -> Any:
    if value is None or type(value) in (bool, int, float, str):  # exactly: an Enum of str is not a str here
        return value
    if isinstance(value, torch.Tensor):
        if id(value) in refs:
            return {"__tensor_ref__": refs[id(value)]}
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]", refs) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]", refs) for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted(value)}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise StateError(f"{where} is a dict with keys other than str or int, which a checkpoint cannot hold; "
                             f"use str or int keys")
        return {"__dict__": [[k, _encode(v, f"{where}[{k!r}]", refs)] for k, v in value.items()]}
    if isinstance(value, torch.Generator):
        return {"__generator__": value.get_state()}
    if isinstance(value, np.random.Generator):
        return {"__np_generator__": _encode(value.bit_generator.state, where, refs)}
    if isinstance(value, random.Random):
        version, internal, gauss = value.getstate()
        return {"__random__": [version, list(internal), gauss]}
    if isinstance(value, torch.optim.Optimizer):
        return {"__optimizer__": value.state_dict()}
    if isinstance(value, nn.Module):
        raise StateError(f"{where} is a network held outside the component's registered submodules (inside a "
                         f"list, dict or tuple), which a checkpoint cannot rebuild; assign it to an attribute "
                         f"of its own (self.name = network) or use an nn.ModuleList")
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        return {"__state__": value.state_dict()}
    raise StateError(f"{where} holds a {type(value).__name__}, which a checkpoint cannot save; give it "
                     f"state_dict()/load_state_dict(), or, if the framework rebuilds it, name it in REFERENCES")


def _decode(saved: Any, current: Any, where: str, tensors: dict[str, torch.Tensor], device: torch.device) -> Any:
    if isinstance(saved, torch.Tensor):
        target = current.device if isinstance(current, torch.Tensor) else device
        return saved.to(target)
    if isinstance(saved, list):
        old = current if isinstance(current, list) else []
        return [_decode(v, old[i] if i < len(old) else None, f"{where}[{i}]", tensors, device)
                for i, v in enumerate(saved)]
    if not isinstance(saved, dict):
        return saved
    kind = next((k for k in _KINDS if k in saved), None)
    value = saved.get(kind)
    if kind == "__tensor_ref__":
        if value not in tensors:
            raise StateError(f"{where} refers to {value}, which the rebuilt component does not have; the "
                             f"checkpoint belongs to another network")
        return tensors[value]
    if kind == "__ndarray__":
        return value.numpy()
    if kind == "__device__":
        return torch.device(value)
    if kind == "__tuple__":
        old = current if isinstance(current, tuple) else ()
        return tuple(_decode(v, old[i] if i < len(old) else None, f"{where}[{i}]", tensors, device)
                     for i, v in enumerate(value))
    if kind == "__set__":
        return set(value)
    if kind == "__dict__":
        old = current if isinstance(current, dict) else {}
        return {k: _decode(v, old.get(k), f"{where}[{k!r}]", tensors, device) for k, v in value}
    if kind == "__generator__":
        generator = current if isinstance(current, torch.Generator) else torch.Generator()
        generator.set_state(value)
        return generator
    if kind == "__np_generator__":
        generator = current if isinstance(current, np.random.Generator) else np.random.default_rng()
        generator.bit_generator.state = _decode(value, None, where, tensors, device)
        return generator
    if kind == "__random__":
        generator = current if isinstance(current, random.Random) else random.Random()
        generator.setstate((value[0], tuple(value[1]), value[2]))
        return generator
    if kind in ("__optimizer__", "__state__"):
        if current is None or not callable(getattr(current, "load_state_dict", None)):
            raise StateError(f"{where} was saved from an object the rebuilt component does not have; create it "
                             f"in __init__ so that a resumed run can restore it")
        current.load_state_dict(value)
        return current
    return saved


def _plain(value: Any) -> bool:
    """Data a module may keep besides its parameters and buffers (a counter, a decay, a setting)."""
    if value is None or type(value) in (bool, int, float, str, torch.device) or isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def _networks(component: Any) -> dict[str, nn.Module]:
    """The networks whose tensors a component's attributes may refer to: its own (if it is a module) and
    any module it references (a plasticity method's network)."""
    if isinstance(component, nn.Module):
        return {"": component}
    return {name: value for name, value in vars(component).items() if isinstance(value, nn.Module)}


def capture(component: Any) -> dict:
    """Everything `component` holds, as checkpointable data (see the module's docstring)."""
    references = set(getattr(component, "REFERENCES", ()))
    refs = _tensor_names(_networks(component))
    attributes = {}
    for name, value in vars(component).items():
        internal = name in _MODULE_INTERNALS and isinstance(component, nn.Module)
        if name in references or internal or isinstance(value, (argparse.Namespace, nn.Module, _CODE)):
            continue  # framework references; nn.Module internals; networks (saved with their weights); code
        attributes[name] = _encode(value, f"{_owner_name(component)}.{name}", refs)
    state = {"attributes": attributes}
    if isinstance(component, nn.Module):
        state["modules"] = {name: {"state": module.state_dict(), "training": module.training,
                                   "frozen": [n for n, p in module.named_parameters() if not p.requires_grad]}
                            for name, module in component._modules.items() if module is not None}
        # The plain data every submodule keeps of its own (an EMA's decay and update count, say), besides
        # its weights; its other attributes are what its constructor builds again.
        state["module_attributes"] = {
            name: {key: _encode(value, f"{_owner_name(component)}.{name}.{key}", refs)
                   for key, value in vars(module).items() if key not in _MODULE_INTERNALS and _plain(value)}
            for name, module in component.named_modules() if name}
    return state


def restore(component: Any, state: dict, device: torch.device | str = "cpu",
            rebuild: Any = None) -> None:
    """Put `capture`'s data back into `component`. A network saved under a name the rebuilt component does not
    have (a copy made during the run, such as a teacher or the previous task's network) is rebuilt by
    `rebuild(name)` (a module of the same architecture) before its weights are loaded."""
    device = torch.device(device)
    owner = _owner_name(component)
    if isinstance(component, nn.Module):
        for name, saved in state.get("modules", {}).items():
            module = component._modules.get(name)
            if module is None:
                module = rebuild(name) if rebuild is not None else None
                if module is None:
                    raise StateError(f"{owner}.{name} is a network made during the run that the rebuilt model "
                                     f"does not have; create it in __init__ (for example as a copy of self.net)")
                setattr(component, name, module)
            try:
                module.load_state_dict(saved["state"])
            except RuntimeError as error:
                first_line = str(error).splitlines()[0]
                raise StateError(f"{owner}.{name} does not match the checkpoint's network ({first_line}); the "
                                 f"checkpoint belongs to another configuration") from None
            module.train(saved["training"])
            frozen = set(saved["frozen"])
            for n, p in module.named_parameters():
                p.requires_grad_(n not in frozen)
        for name, attributes in state.get("module_attributes", {}).items():
            try:
                module = component.get_submodule(name)
            except AttributeError:
                raise StateError(f"{owner}.{name} is a network the checkpoint has and the rebuilt model has not; the "
                                 f"checkpoint belongs to another configuration") from None
            for key, saved in attributes.items():
                setattr(module, key, _decode(saved, getattr(module, key, None), f"{owner}.{name}.{key}", {}, device))
    tensors = dict(_named_tensors(_networks(component)))
    for name, saved in state["attributes"].items():
        current = getattr(component, name, None)
        value = _decode(saved, current, f"{owner}.{name}", tensors, device)
        if value is not current:
            setattr(component, name, value)
