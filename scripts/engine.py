"""Engine core and workers only, listening for frontends: the same as `zomni engine`.

    python scripts/engine.py --help
"""

import sys

from zomni.frontend.cli import main

if __name__ == "__main__":
    main(["engine", *sys.argv[1:]])
