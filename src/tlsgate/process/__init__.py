"""The process: start-up, signals, reloads, workers, systemd, logs and platform guards."""
