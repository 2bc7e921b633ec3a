"""An HTTP frontend for a running engine: the same as `zomni frontend`.

    python scripts/frontend.py --help
"""

import sys

from zomni.frontend.cli import main

if __name__ == "__main__":
    main(["frontend", *sys.argv[1:]])
