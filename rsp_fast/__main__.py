"""``python -m rsp_fast``: the ``rsp-fast`` command."""
import sys

from .cli import main

sys.exit(main())
