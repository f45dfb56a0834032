"""``python -m balsam.site [SITE_PATH]``: run the site agent in the foreground."""

import sys

from .agent import main

sys.exit(main())
