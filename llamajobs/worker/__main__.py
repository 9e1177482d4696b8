"""`torchrun ... -m llamajobs.worker RUN_DIR`"""

import sys

from llamajobs.worker.train import main

if __name__ == "__main__":
    sys.exit(main())
