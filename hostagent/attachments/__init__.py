"""The attach/detach core: orchestration (service), the host connection and
its refcount (host_connections), the guest's side of an attach (guest_disks),
the disk a request gets (render), and the passes that settle records against
libvirt (reconcile, rebuild, diagnostics)."""
