"""Log every garbage collection over 1 ms, in every Python process started with this on the path.

Put this directory on ``PYTHONPATH`` and name an output directory in ``GCPROBE_DIR``; each
process (the benchmark, the devbroker, the daemons) writes ``gc-PID.txt`` there: its
command line, then one line per collection over 1 ms (epoch seconds, generation,
duration, objects collected)::

    GCPROBE_DIR=/tmp/gc PYTHONPATH=benchmarks/gc_probe \\
        python benchmarks/pipeline.py --modes 100 --rates 1000 --seconds 30 --messages 10000

Without ``GCPROBE_DIR`` it does nothing.
"""

import gc
import os
import sys
import time

_OUT = os.environ.get("GCPROBE_DIR")
if _OUT:
    _log = open(os.path.join(_OUT, f"gc-{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115 - open for the process's life
    _log.write(f"argv {sys.argv}\n")
    _started = [0.0]

    def _on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        took_ms = (time.perf_counter() - _started[0]) * 1000
        if took_ms > 1.0:
            _log.write(
                f"{time.time():.3f} gen{info['generation']} {took_ms:.2f}ms "
                f"collected={info['collected']}\n"
            )

    gc.callbacks.append(_on_collection)
