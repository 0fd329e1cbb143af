"""The sans-I/O core: decoded messages in; timers, decisions and events out.

Nothing here opens, reads or signals anything, nor reads a clock: the time is passed in,
and what the core needs to know about a process it gets as facts from the edge
(``ftimer_server.server``), which owns every system call and its errors.
"""
