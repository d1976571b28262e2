"""`name=value` items from a command line, split and checked in one place.

    split_items(["epsilon=0.5", "dist=l2"], what="defense parameter", example="epsilon=0.5")
    -> [("epsilon", "0.5"), ("dist", "l2")]

Used by the defenses' and attacks' `--param` parsers and by `reproduce --set`, which each
convert the values their own way (strings for typed Params, YAML for spec overrides). An
item without `=` or with an empty name, and (unless `repeat=True`) a name given twice, is
a ConfigError that names the item and shows an example.
"""

from __future__ import annotations

from collections.abc import Iterable

from stealguard.errors import ConfigError


def split_items(items: Iterable[str], *, what: str, example: str, pattern: str = "name=value",
                repeat: bool = False) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{what} {item!r} must look like {pattern}, for example {example}")
        if key in seen and not repeat:
            raise ConfigError(f"{what} {key!r} given twice")
        seen.add(key)
        out.append((key, value.strip()))
    return out
