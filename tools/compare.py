#!/usr/bin/env python
"""Every installed test-time method side by side: a thin CLI over ``tttlab.core.compare``.

    python tools/compare.py                                   # the demo set, profile full
    python tools/compare.py profile=quick jobs=2 out_dir=runs/cmp
    python tools/compare.py 'methods=[torch_ttt.*]' 'seeds=[0,1,2]' 'setting=[reset_each_shift,continual]'
    python tools/compare.py --list                            # installed methods (and what is missing)
    python tools/compare.py --help                            # every option (conf/compare.yaml)

The same tool is installed as the console script ``tttlab-compare``.  ``make demo`` runs
``python -m tttlab.core.demo``, which draws the corruption grid and then runs this same comparison.
"""

import sys

from tttlab.core.compare import main

if __name__ == "__main__":
    sys.exit(main(prog="tools/compare.py"))
