"""Stage I for launchers that take a script path (`accelerate launch train/stage1.py ...`, torchrun, srun).

The stage lives in the package, emi/stages/stage1.py: `python -m emi.stages.stage1` and `emi train stage1` run it too.
"""

import sys

from emi.stages.stage1 import main

if __name__ == "__main__":
    sys.exit(main())
