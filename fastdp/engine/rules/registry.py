"""The registry of forward rules: layer class -> Rule (register_rule, rule_for, supported_names).

It imports no rule family: the families import it and register themselves (rules/__init__.py
imports them all), so the registry is complete once `fastdp.engine.rules` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

# The parameter attributes a rule records per-sample gradients for unless it says otherwise.
DEFAULT_PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class Rule:
    """A forward rule for `module_class`.

    forward(module, call, *args, **kwargs) -> the module's output, computed so that the
        backward records the per-sample information of `params` into call.tape.
    params: the names of the module's registered parameters the rule covers; any other
        trainable parameter of the module is refused (grad_sample._check_rule_params).
    """

    module_class: type[nn.Module]
    forward: Callable
    params: tuple[str, ...] = DEFAULT_PARAMS


_RULES: dict[type[nn.Module], Rule] = {}  # in registration order (supported_names keeps it)


def register_rule(*module_classes: type[nn.Module], params: tuple[str, ...] = DEFAULT_PARAMS) -> Callable:
    """Decorator: registers `forward(module, call, *args, **kwargs)` as the rule of these classes.

        @fastdp.register_rule(MyLayer)
        def my_layer_forward(module: MyLayer, call: Call, x: torch.Tensor) -> torch.Tensor: ...

    The rule applies to instances of the classes and of subclasses that keep the class's
    forward (a subclass with its own forward goes through the generic path unless it has its own
    rule). Registering a class again replaces its rule (this is also how a built-in rule is
    overridden); unregister_rule removes it. Rules are looked up when a model is made private.
    Returns the function unchanged.
    """
    if not module_classes:
        raise TypeError("register_rule needs at least one module class: @register_rule(MyLayer)")
    for cls in module_classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_rule: expected nn.Module subclasses, got {cls!r}")
    params = tuple(params)
    if not params or not all(isinstance(p, str) for p in params):
        raise TypeError(f"register_rule: params must be parameter names, got {params!r}")

    def decorator(forward: Callable) -> Callable:
        for cls in module_classes:
            _RULES.pop(cls, None)  # re-registering moves it to the end, as a new rule
            _RULES[cls] = Rule(cls, forward, params)
        return forward

    return decorator


def unregister_rule(*module_classes: type[nn.Module]) -> None:
    """Removes the rules of these classes (a KeyError names one that has none)."""
    missing = [cls.__name__ for cls in module_classes if cls not in _RULES]
    if missing:
        raise KeyError(f"unregister_rule: no rule registered for {', '.join(missing)}")
    for cls in module_classes:
        del _RULES[cls]


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for `module`, or None (the generic path, or refused).

    The nearest registered class in type(module)'s MRO decides; its rule applies only if the
    module's class keeps that class's forward (else the rule would not compute what it runs).
    """
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None


def supported_names() -> list[str]:
    """Class names of the layers with a registered rule, in registration order."""
    return [cls.__name__ for cls in _RULES]
