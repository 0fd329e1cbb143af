"""The server: the FIFO, the I/O loop and the process edge around the core, and
``FileTimerServer``, the embeddable façade (a drop-in for torch's)."""
