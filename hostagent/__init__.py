"""hostagent: connect shared volumes once per host, attach them to libvirt guests."""

import warnings

# oslo.privsep imports eventlet, which warns on import; hostagent never uses
# eventlet (no monkey patching), so the warning only confuses operators.
warnings.filterwarnings("ignore", message="\\s*Eventlet is deprecated")

__version__ = "0.1.0"
