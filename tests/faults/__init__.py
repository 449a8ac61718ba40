"""Fault injection, bad input and shutdown scenarios (see docs/RELIABILITY.md)."""
