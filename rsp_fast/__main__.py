"""``python -m rsp_fast``: the ``rsp-fast`` command."""
from .cli import run

run()
