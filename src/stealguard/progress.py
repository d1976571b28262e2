"""Progress bars for long phases that have no loop of their own to hook into.

`query_progress` watches a black box's query counter from a background thread, so the
query phase of any attack (local or over HTTP) shows a moving bar without the attack
knowing about it:

    with query_progress(blackbox, total=budget, enabled=progress):
        result = attack(blackbox, budget)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def query_progress(blackbox: Any, *, total: int, enabled: bool, desc: str = "queries",
                   every_s: float = 0.5) -> Iterator[Any]:
    """A bar of `blackbox.queries_used` (counted from entry) out of `total`, refreshed every
    `every_s` seconds while the block runs (yields the tqdm bar); nothing at all (yields None)
    when not `enabled`."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    start = int(blackbox.queries_used)
    bar = tqdm(total=total, desc=desc, unit="q", leave=False)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            bar.n = min(total, int(blackbox.queries_used) - start)
            bar.refresh()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        bar.close()
