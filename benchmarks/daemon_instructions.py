"""Instructions per message of the processor and the persister, for callgrind.

Instruction counts do not move with the machine's load, so two trees can be
compared on a busy machine. Runs ``tracing_cost.py``'s processor and persister
cases (real spans and OTLP/HTTP export to a local receiver, fdatasync a
no-op) after a 300-message warm-up::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/daemon_instructions.py MODE STAGE N

MODE is ``100`` (every message traced) or ``off``; STAGE ``proc`` runs N
messages through the processor, ``both`` also through the persister. The
processor's instructions per message are (proc N - proc 0) / N, the
persister's (both N - proc N) / N.
"""

import gc
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.tracing_cost as tc
from benchmarks.otlp_sink import OtlpSink


def main(mode: str, stage: str, n: int) -> None:
    gc.set_threshold(50_000, 10, 10)  # as the daemons set it
    with OtlpSink() as sink, tempfile.TemporaryDirectory() as tmp:
        endpoint = sink.endpoint if mode == "100" else None
        ratio = 1.0 if mode == "100" else 0.0
        processor = tc.telemetry(endpoint, ratio, "processor")
        persister = tc.telemetry(endpoint, ratio, "persister")
        _, warm = tc.processor(processor, 300, ratio)
        tc.persister(persister, warm, Path(tmp), 0)
        if n:
            _, outputs = tc.processor(processor, n, ratio)
            if stage == "both":
                tc.persister(persister, outputs, Path(tmp), 1)
        processor.shutdown()
        persister.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
