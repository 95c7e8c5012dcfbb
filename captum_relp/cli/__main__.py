"""``python -m captum_relp.cli``: the same as the ``captum-relp`` command."""
import sys

from . import main

sys.exit(main())
