"""``python -m hostagent.daemon`` runs hostagentd."""

import sys

from hostagent.daemon.main import main

sys.exit(main())
