"""The host side: who uses a host block device (the check before every
disconnect: domains, then processes holding it) and the host's network view
of a storage target."""
