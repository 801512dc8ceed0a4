"""``python -m chatloop.runtime --index K --config FILE --coordinator HOST:PORT``: one worker process."""

import sys

from .worker import main

sys.exit(main())
