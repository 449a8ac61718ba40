"""Fault injection, bad input and shutdown scenarios for the whole pipeline (docs/RELIABILITY.md)."""
