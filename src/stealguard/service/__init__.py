"""The defended prediction service: a model behind HTTP with keys, budgets and an audit log.

    app.py       create_app(model, defense=, store=, limits=): the FastAPI app
    served.py    ServedModel, load_served_model(path): artifacts by manifest format
    store.py     KeyStore: hashed keys, atomic budget and rate accounting, audit log (SQL)
    batching.py  MicroBatcher: concurrent requests -> one model batch, in a worker thread
    codec.py     the request format (base64 PNG/JPEG or pixel arrays), its bounded parser
    errors.py    the refusals and their codes (REFUSALS)
    server.py    ServerLimits and the guarded h11 protocol under uvicorn (headers, timeouts)
    metrics.py   ServiceMetrics: Prometheus counters and histograms of one app
    client.py    HttpBlackBox: the service as a BlackBox, so attacks run over HTTP
    cli.py       serve_command, keys_app, audit_app (show, refused, verify)

Importing this package does not import FastAPI, SQLAlchemy or httpx; the names below load
their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "app", "Limits": "app",
    "ServedModel": "served", "load_served_model": "served", "SERVED_FORMATS": "served",
    "KeyStore": "store", "ApiKey": "store", "Charge": "store",
    "MicroBatcher": "batching",
    "HttpBlackBox": "client",
    "ServiceError": "errors", "AuthError": "errors", "RateLimited": "errors",
}
__all__ = [
    "SERVED_FORMATS", "ApiKey", "AuthError", "Charge", "HttpBlackBox", "KeyStore", "Limits",
    "MicroBatcher", "RateLimited", "ServedModel", "ServiceError", "create_app",
    "load_served_model",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stealguard.service' has no attribute {name!r}")
    return getattr(importlib.import_module(f"stealguard.service.{_EXPORTS[name]}"), name)
