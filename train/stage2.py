"""Stage II for launchers that take a script path (`accelerate launch train/stage2.py ...`, torchrun, srun).

The stage lives in the package, emi/stages/stage2.py: `python -m emi.stages.stage2` and `emi train stage2` run it too.
"""

import sys

from emi.stages.stage2 import main

if __name__ == "__main__":
    sys.exit(main())
