"""Incidents: why a stuck worker hangs, captured before it is reaped.

Capture methods (py-spy, the worker's own faulthandler hook, /proc facts, gcore), the
signal to a worker's descendants, the incident directory, and ``Diagnostics``, which runs
the captures the core asks for off the loop and writes one incident per reap. Below the
server (it uses the core's types only); the record, the grouping and the report are pure
and live in the core. See docs/incidents.md.
"""
