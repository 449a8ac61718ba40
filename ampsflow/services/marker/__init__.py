"""The marker: the React page that starts every trace, and its web server.

The page's built assets live in ``static/`` (built from ``marker/`` at the
repository root with ``npm run build``); :mod:`ampsflow.services.marker.server`
serves them together with ``/config.json`` and the OTLP and AMPS proxies.
"""
