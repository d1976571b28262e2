"""stealguard: defenses against model stealing (EDM, MAD) and honest measurement of them."""

__version__ = "0.1.0"

# The public API, imported on first use (so `import stealguard` and `stealguard --help` stay
# fast): stealguard.wrap(module, ...), stealguard.register_model("name"), stealguard.Victim.
_LAZY = {
    "wrap": "stealguard.wrapped", "WrappedModel": "stealguard.wrapped",
    "register_model": "stealguard.models", "Victim": "stealguard.victim",
    "Predictor": "stealguard.victim", "DefendedPredictor": "stealguard.defended",
    "load_victim": "stealguard.formats", "save_victim": "stealguard.formats",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stealguard' has no attribute {name!r}")
