"""``python -m ftimer_server.incidents``: the capture helper a server with incidents runs
(see ``_helper``); not a command for people."""

from ._helper import main

main()
