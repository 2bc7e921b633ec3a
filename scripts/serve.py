"""Engine core, workers and an HTTP frontend in one command: the same as `zomni serve`.

    python scripts/serve.py --help
"""

import sys

from zomni.frontend.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
