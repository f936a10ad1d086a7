"""The libvirt side: a pool of libvirt connections, domains and their device
changes and events, and reads of every domain's XML."""
