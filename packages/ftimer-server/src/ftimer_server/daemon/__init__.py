"""The ``ftimer-server`` daemon: command line, config, state file, control socket,
logging, metrics and systemd, around an embedded ``FileTimerServer``."""
