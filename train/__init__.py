"""Training: `python -m train`. The loop (train.loop) does not know which loader feeds it."""

import time

# The clock of metrics.json's wall_seconds. `python -m train` imports this package before anything else (before
# torch), so wall_seconds covers the whole command but the interpreter's own start (tens of milliseconds).
STARTED = time.perf_counter()


def wall_seconds() -> float:
    """Seconds since this package was imported: for `python -m train`, the whole command so far."""
    return time.perf_counter() - STARTED
