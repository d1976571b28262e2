"""Registered tasks: what one cell of a spec measures (see `base`)."""

from stealguard.reproduce.tasks import angular_deviation as _angular_deviation  # noqa: F401
from stealguard.reproduce.tasks import coherence as _coherence  # noqa: F401
from stealguard.reproduce.tasks import detect as _detect  # noqa: F401
from stealguard.reproduce.tasks import hash_histogram as _hash_histogram  # noqa: F401
from stealguard.reproduce.tasks import runtime as _runtime  # noqa: F401
from stealguard.reproduce.tasks import steal as _steal  # noqa: F401  (registers "steal")
from stealguard.reproduce.tasks import toy2d as _toy2d  # noqa: F401
from stealguard.reproduce.tasks import victim as _victim  # noqa: F401
from stealguard.reproduce.tasks.base import TASKS, CellBase, CellResult, RunContext, Task

__all__ = ["TASKS", "CellBase", "CellResult", "RunContext", "Task"]
