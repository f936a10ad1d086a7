"""hostagentd: options, wiring, systemd integration (``python -m hostagent.daemon``)."""

import os

# os-brick's privsep imports eventlet, whose green DNS loads dnspython (a
# third of a second natively, seconds in the lab VM). hostagentd never
# monkey-patches, so it never uses green DNS; set before any daemon import.
os.environ.setdefault("EVENTLET_NO_GREENDNS", "yes")
