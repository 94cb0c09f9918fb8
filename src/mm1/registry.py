"""Name -> builder registries: every swappable component (encoder, connector, loss, task...) is
chosen by a readable string in the config, the way prismatic-vlms picks backbones by id.

A registry a config selects from also holds the component's rules: `register(name, validate=fn)` and
`validates(fn)` (rules every entry shares) take `fn(cfg: Config)`, run by `mm1.config.validate` at
load time. The config layer reaches them without importing the layers above it: `check_config`
imports each package in `HOMES` by name (the way entry points are found), which fills the
registries, then runs every selected entry's rules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from operator import attrgetter
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Check = Callable[[Any], None]  # fn(cfg: mm1.config.Config) -> None, raises ConfigError

# the packages whose import fills the registries a config selects from
HOMES = ("mm1.models", "mm1.train.stages", "mm1.train.loggers", "mm1.eval.tasks")


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key, the value and what is allowed."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `ConfigError("key=value: allowed")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def one_of(key: str, value: str, allowed: list[str] | tuple[str, ...]) -> None:
    check(value in allowed, key, value, f"must be one of {', '.join(allowed)}")


class Registry(Generic[T]):
    """A plain dict of named builders with an error that lists the allowed names.

    `select` (cfg -> the names the config picks) makes the registry part of config validation."""

    def __init__(self, what: str, key: str, select: Callable[[Any], list[str]] | None = None) -> None:
        self.what = what  # human name, e.g. "connector"
        self.key = key  # config key that selects it, e.g. "model.connector.kind"
        self._items: dict[str, T] = {}
        self._validators: dict[str, Check] = {}
        self._shared: list[Check] = []
        self.select = select
        if select is not None:
            _SELECTED.append(self)

    def register(self, name: str, validate: Check | None = None) -> Callable[[T], T]:
        """Decorator: `name` builds with the decorated item; `validate(cfg)` checks a config choosing it."""

        def decorate(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.what} {name!r} registered twice")
            self._items[name] = item
            if validate is not None:
                self._validators[name] = validate
            return item

        return decorate

    def validates(self, fn: Check) -> Check:
        """Decorator: a rule every config selecting from this registry must meet, whichever entry."""
        self._shared.append(fn)
        return fn

    def check(self, cfg: Any) -> None:
        """The names `cfg` selects exist, and their rules (shared first) hold."""
        names = self.select(cfg) if self.select is not None else []
        for name in names:
            self.get(name)
        for fn in self._shared:
            fn(cfg)
        for name in names:
            if name in self._validators:
                self._validators[name](cfg)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"{self.key}={name!r}: unknown {self.what}; allowed: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


_SELECTED: list[Registry] = []  # registries with a `select`, in creation order (encoder, connector, LM, ...)


def at_key(key: str) -> Callable[[Any], list[str]]:
    """`select` for a registry chosen by one string key of the config, e.g. "model.connector.kind"."""
    get = attrgetter(key)
    return lambda cfg: [get(cfg)]


def check_config(cfg: Any) -> None:
    """Run every registered component rule for `cfg` (called by `mm1.config.validate`)."""
    for home in HOMES:
        importlib.import_module(home)
    for registry in _SELECTED:
        registry.check(cfg)
