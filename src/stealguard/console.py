"""What the command line prints, in one place: strict JSON, tables, progress switches, and the
checks of output paths made before any work starts. Imports no torch (so `--help` is fast).

    print(to_json({"kl_mean": float("inf")}))   # {"kl_mean": null, "non_finite": {"kl_mean": "+inf"}}
    emit({"test_accuracy": 0.8532, "n": 10000}, as_json=False, title="evaluation")
    #  test_accuracy   85.32 %
    #  n               10000     (an int: a count)
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stealguard.errors import ConfigError

# ---- strict JSON -----------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """Replace NaN / +-inf by None, recursively; a dict with such a value gets a `non_finite`
    entry naming each replaced key and what it was ("nan", "+inf", "-inf")."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        reasons: dict[str, str] = {}
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                reasons[str(k)] = "nan" if math.isnan(v) else ("+inf" if v > 0 else "-inf")
            out[str(k)] = _finite(v)
        if reasons:
            out["non_finite"] = {**out.get("non_finite", {}), **reasons}
        return out
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor / numpy scalar
        return _finite(value.item())
    return value


def to_json(value: Any) -> str:
    """Strict JSON (RFC 8259): NaN and infinity become null, noted under `non_finite`."""
    return json.dumps(_finite(value), default=str, allow_nan=False)


def print_json(value: Any) -> None:
    print(to_json(value))


# ---- tables ----------------------------------------------------------------------------------

PERCENT_WORDS = ("accuracy", "agreement", "fidelity", "argmax_changed")
RATIO_PREFIXES = ("normalized_",)


def format_value(key: str, value: Any) -> str:
    """How a figure reads in a table: fractions as `85.32 %` (accuracy, agreement, ...),
    normalised ratios as `0.86x`, counts (ints) as integers, seconds as `9.4 s`, other floats
    with 4 decimals (scientific below 1e-3), NaN/inf as `-` / `inf`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "-" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if key.startswith(RATIO_PREFIXES):
        return f"{value:.2f}x"
    if any(word in key for word in PERCENT_WORDS):
        return f"{100 * value:.2f} %"
    if key == "seconds" or key.endswith("_seconds"):
        return f"{value:.1f} s"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"


def console() -> Any:
    from rich.console import Console

    # A wide console when piped, so tables are not squeezed into 80 columns in logs.
    return Console(width=None if sys.stdout.isatty() else 140)


def emit(figures: Mapping[str, Any], as_json: bool, title: str) -> None:
    """One JSON object (--json) or a two-column table of figures."""
    if as_json:
        print_json(figures)
        return
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in figures.items():
        table.add_row(k, format_value(k, v))
    console().print(table)


def show_progress(as_json: bool) -> bool:
    """Progress bars only for a person watching: not under --json, not when piped."""
    return not as_json and sys.stdout.isatty() and sys.stderr.isatty()


# ---- output paths, checked before the work --------------------------------------------------


def check_output_dir(path: Path, option: str, *, force: bool = False,
                     artifact_marker: str | None = "manifest.json") -> Path:
    """Refuse an output directory that cannot be written, before any work is done.

    path must be a directory or not exist yet, and its nearest existing ancestor must be a
    writable directory. With `artifact_marker`, an existing artifact there is refused unless
    `force` (nothing is overwritten silently).
    """
    path = Path(path).expanduser()
    if "\x00" in str(path):
        raise ConfigError(f"{option} {path!s}: not a valid path")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a directory; give a directory")
    if artifact_marker and (path / artifact_marker).exists() and not force:
        raise ConfigError(f"{option} {path}: an artifact already exists there; pass --force "
                          "to overwrite it, or give another directory")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ConfigError(f"{option} {path}: {ancestor} is a file, so the directory cannot be "
                          "created; give another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {ancestor} is not writable; give a directory "
                          "you can write to")
    return path


def os_error_line(err: OSError) -> str:
    """An OSError as one line that says what and where."""
    where = f": {err.filename}" if err.filename else ""
    what = err.strerror or str(err)
    return f"{what}{where}; check the path and its permissions"


def validation_line(err: Any, *, flags: bool = True, what: str = "option") -> str:
    """A pydantic ValidationError as one line naming each field and its valid range.

    flags=True names fields as command-line flags (`epochs` -> `--epochs`)."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or what
        name = f"--{field.replace('_', '-')}" if flags else field
        parts.append(f"{name} {_got(e)}: {_expected(e)}")
    return "; ".join(parts)


def _got(e: Mapping[str, Any]) -> str:
    return f"got {e['input']!r}" if "input" in e and not isinstance(e["input"], dict) else ""


def _expected(e: Mapping[str, Any]) -> str:
    ctx = e.get("ctx") or {}
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if e["type"] in bounds:
        op, key = bounds[e["type"]]
        return f"must be {op} {ctx.get(key)}"
    if e["type"] == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if e["type"] == "extra_forbidden":
        return "unknown field"
    return str(e["msg"]).lower().removeprefix("value error, ")

