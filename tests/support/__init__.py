"""Helpers shared by the integration and end-to-end tests.

- :mod:`tests.support.processes`: run the devbroker, processor and persister as
  subprocesses (ready on ``READY=1`` or an open port; SIGTERM, SIGKILL, restart;
  always cleaned up) with generated YAML configs.
- :mod:`tests.support.phoenix`: a real OTLP trace backend (Arize Phoenix) and
  read-back of every stored span.
- :mod:`tests.support.load`: a steady traced publisher.
"""
