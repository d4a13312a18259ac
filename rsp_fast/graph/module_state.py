"""What a traced graph holds of a model besides its tensors: each module's class, forward,
children, hooks and plain attributes, snapshotted when a plan is built, so that
``Plan.is_current`` can tell whether the model is still the one the plan was traced from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as torch_module

# nn.Module's own bookkeeping, and the mode RSP itself switches: not part of what a forward does
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def global_hooks() -> tuple:
    return tuple(torch_module._global_forward_pre_hooks), tuple(torch_module._global_forward_hooks)


def _attribute_value(value):
    """A snapshot of an attribute a traced forward may have read as a constant (a number, a
    string, a function or method, tuples, lists and dicts of them), or ``_SKIP`` for tensors and
    other objects, which the graph reads by reference or not at all."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):  # torch.Size and named tuples too: compared as plain tuples
        items = tuple(_attribute_value(v) for v in value)
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict):
        items = tuple((k, _attribute_value(v)) for k, v in value.items())
        return _SKIP if any(v is _SKIP or not isinstance(k, _PLAIN) for k, v in items) else items
    if callable(value) and not isinstance(value, (nn.Module, torch.Tensor)):
        return value
    return _SKIP


_SKIP = object()


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, (*_PLAIN, tuple)) and a == b)


def _class_forward(cls: type):
    """A module class's forward as the class holds it: a TorchScript module's is a descriptor
    that fails when read through the class (looked up along the MRO as inspect.getattr_static
    does, at a tenth of its cost: it runs for every module at every call)."""
    for base in cls.__mro__:
        forward = base.__dict__.get("forward", _SKIP)
        if forward is not _SKIP:
            return forward
    return None


@dataclass
class ModuleState:
    module: nn.Module
    cls: type
    forward: Callable  # its class's forward (patched on the class, it is another function)
    children: tuple  # (name, child) pairs, in order
    hooks: tuple  # the keys of its forward pre-hooks and forward hooks
    attributes: dict  # name → (the object it held: numbers, strings, tuples, functions; its snapshot)
    lists: dict  # name → (the list or dict it held, its snapshot then: it may change in place)
    names: frozenset | None = None  # its attributes' names (None for a leaf): one added may be read
    global_hooks: tuple = ()
    absent: tuple | None = None  # a norm's statistics set to None (BatchNorm then uses the batch's); None: not a norm

    @classmethod
    def of(cls, module: nn.Module, leaf: bool = False) -> "ModuleState":
        attributes, lists = {}, {}
        # a module the graph calls whole reads its attributes itself: only those its class declares
        # constant (a conv's stride, padding_mode) shape the plan, not a statistic a hook keeps there
        declared = set().union(*(getattr(c, "__constants__", ()) for c in type(module).__mro__)) if leaf else None
        for k, v in module.__dict__.items():
            if declared and k not in declared and k != "forward":
                continue
            if k not in _MODULE_INTERNALS and _attribute_value(v) is not _SKIP:
                if isinstance(v, (list, dict)):
                    lists[k] = (v, _attribute_value(v))
                else:
                    attributes[k] = (v, _attribute_value(v))
        attributes.setdefault("forward", (_SKIP, _SKIP))  # a forward set on the instance later is a change too
        return cls(module, type(module), _class_forward(type(module)), tuple(module._modules.items()), _hooks(module),
                   attributes, lists, None if leaf else frozenset(module.__dict__), absent=_absent(module))

    def keep_attributes(self) -> None:
        """Its plain attributes as they are now (what its forward wrote onto it); its class,
        children, hooks and a forward set on the instance stay as traced."""
        now = ModuleState.of(self.module, leaf=self.names is None)
        now.attributes["forward"] = self.attributes["forward"]
        self.attributes, self.lists, self.names = now.attributes, now.lists, now.names

    def holds(self) -> bool:
        m = self.module
        if m.__class__ is not self.cls or _class_forward(self.cls) is not self.forward or _hooks(m) != self.hooks:
            return False
        if self.absent is not None and _absent(m) != self.absent:
            return False
        children = m._modules
        if len(children) != len(self.children):
            return False
        for name, child in self.children:
            if children.get(name) is not child:
                return False
        now = m.__dict__
        if self.names is not None and now.keys() != self.names:  # getattr(self, "flag", False) set since
            return False
        for k, (v, snapshot) in self.attributes.items():  # the same object (one identity test), else an equal value
            value = now.get(k, _SKIP)
            if value is not v and not _same(_attribute_value(value), snapshot):
                return False
        for k, (v, snapshot) in self.lists.items():
            if now.get(k, _SKIP) is not v or _attribute_value(v) != snapshot:
                return False
        return True


def _absent(module: nn.Module) -> tuple | None:
    """Which running statistics of a norm are None (only norms keep them: checked on those alone)."""
    buffers = module._buffers
    return (buffers.get("running_mean") is None, buffers["running_var"] is None) if "running_var" in buffers else None


def _hooks(module: nn.Module) -> tuple:
    return tuple(module._forward_pre_hooks), tuple(module._forward_hooks)  # their handles' ids


def module_states(model: nn.Module, leaves: frozenset = frozenset()) -> list[ModuleState]:
    states, seen, todo = [], set(), [model]
    while todo:
        module = todo.pop()
        if id(module) not in seen:
            seen.add(id(module))
            states.append(ModuleState.of(module, id(module) in leaves))
            todo += [child for child in module._modules.values() if child is not None]
    if states:
        states[0].global_hooks = global_hooks()
    return states
