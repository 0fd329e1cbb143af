"""The README's main job. Until the server exists it runs the protocol's self-check."""

import runpy

runpy.run_module("ftimer_protocol", run_name="__main__")
