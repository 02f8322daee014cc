"""One registry for reward functions.

Every reward function has one signature::

    fn(prompt: str, response: str, answer: str | None, metadata: dict) -> float

`prompt` is the prompt text as the model saw it, `response` the decoded completion,
`answer` the dataset's gold answer (None when the dataset has none) and `metadata`
the row's other fields (e.g. ``tests`` for code, ``task`` for built-in tasks); the
function returns a finite float. It may raise; the scorer turns that into reward 0
and a recorded failure.

Built-ins register themselves with ``@register("name")``. A user function is named in
``reward.functions`` by import path, ``"pkg.module:func"``, and needs no registration.

Some functions need the reward config (the remote server's url, retries...) or a check
before they may run (the code reward's sandbox): they are registered with ``factory=True``
and are then *factories*, ``make(cfg) -> fn``; `get_reward_fn` calls them. Functions that mostly wait on the network are registered
with ``io_bound=True``: the scorer runs them on threads in the caller's process
(bounded by ``reward.max_concurrency``) instead of in the worker processes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol


class RewardFn(Protocol):
    def __call__(self, prompt: str, response: str, answer: Optional[str], metadata: dict) -> float: ...


class RewardFunctionError(ValueError):
    """A reward function name or import path that cannot be resolved; the message names it."""


@dataclass(frozen=True)
class RewardEntry:
    name: str
    fn: Callable[..., Any]
    factory: bool = False
    io_bound: bool = False


_REGISTRY: dict[str, RewardEntry] = {}


def register(name: str, *, factory: bool = False, io_bound: bool = False):
    """Decorator: make `fn` available to ``reward.functions`` as `name`."""
    if ":" in name:
        raise ValueError(f"reward name {name!r} may not contain ':' (that marks an import path)")

    def deco(fn):
        old = _REGISTRY.get(name)
        if old is not None and old.fn is not fn and (old.fn.__module__, old.fn.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ValueError(f"reward name {name!r} is already registered to {old.fn.__module__}.{old.fn.__qualname__}")
        _REGISTRY[name] = RewardEntry(name, fn, factory, io_bound)
        return fn

    return deco


def available() -> list[str]:
    """Names of the registered reward functions."""
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    # Importing the modules runs their @register decorators.
    from rewards import verifiers, remote, code_exec  # noqa: F401


def _import_path(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RewardFunctionError(f"reward function {spec!r}: an import path must look like 'pkg.module:func'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        raise RewardFunctionError(
            f"cannot import reward function {spec!r}: importing module {module_name!r} failed "
            f"({type(e).__name__}: {e})"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise RewardFunctionError(
                f"cannot import reward function {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from e
    if not callable(obj):
        raise RewardFunctionError(f"reward function {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def get_entry(name_or_path: str) -> RewardEntry:
    """The registry entry for a name, or an ad-hoc entry for an import path."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise RewardFunctionError(f"reward function must be a non-empty name or import path, got {name_or_path!r}")
    if ":" in name_or_path:
        fn = _import_path(name_or_path)
        # A user function may itself be registered as a factory / io-bound.
        for entry in _REGISTRY.values():
            if entry.fn is fn:
                return RewardEntry(name_or_path, fn, entry.factory, entry.io_bound)
        return RewardEntry(name_or_path, fn)
    _load_builtins()
    if name_or_path not in _REGISTRY:
        raise RewardFunctionError(
            f"unknown reward function {name_or_path!r}; registered: {', '.join(sorted(_REGISTRY))}; "
            f"or give an import path 'pkg.module:func'"
        )
    return _REGISTRY[name_or_path]


def get_reward_fn(name_or_path: str, cfg: Any = None) -> RewardFn:
    """Resolve a registered name or a ``"pkg.module:func"`` path to a reward function.

    `cfg` (a `cispo.config.RewardConfig`) is passed to factory entries (e.g. "remote");
    when omitted they get a default `RewardConfig`.
    """
    entry = get_entry(name_or_path)
    if not entry.factory:
        return entry.fn
    if cfg is None:
        from cispo.config import RewardConfig

        cfg = RewardConfig()
    fn = entry.fn(cfg)
    if not callable(fn):
        raise RewardFunctionError(f"reward factory {name_or_path!r} returned a non-callable {type(fn).__name__}")
    return fn
