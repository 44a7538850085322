"""``python -m unleash_ood`` is the ``unleash`` command (handy under ``torchrun -m``)."""

import sys

from unleash_ood.cli import main

sys.exit(main())
