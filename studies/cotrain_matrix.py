"""The co-training matrix: which data sets and tasks help or hurt which when trained together.

    python studies/cotrain_matrix.py [--config studies/configs/X.yaml] [--out DIR] [--resume] [--dry-run]

The same as `omgseg study`; see `--help` and the README's "Studies" section.
"""

import sys

from omgseg.platform.study.driver import main

if __name__ == "__main__":
    sys.exit(main(prog="cotrain_matrix.py"))
