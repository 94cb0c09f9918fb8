"""Name -> builder registries: every swappable component (encoder, connector, loss, task...) is
chosen by a readable string in the config, the way prismatic-vlms picks backbones by id."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key, the value and what is allowed."""


class Registry(Generic[T]):
    """A plain dict of named builders with an error that lists the allowed names."""

    def __init__(self, what: str, key: str) -> None:
        self.what = what  # human name, e.g. "connector"
        self.key = key  # config key that selects it, e.g. "model.connector.kind"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.what} {name!r} registered twice")
            self._items[name] = item
            return item

        return decorate

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(
                f"{self.key}={name!r}: unknown {self.what}; allowed: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
