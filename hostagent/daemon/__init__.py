"""hostagentd: options, wiring, systemd integration (``python -m hostagent.daemon``)."""
