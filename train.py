"""The authors' entry point, kept so their command lines work verbatim: `python train.py [flags] DATA`.

Forwards to `videomoco pretrain` with the authors' recipe where their train.py computes otherwise than our
defaults (`engine.config.AUTHORS_DEFAULTS`: `--aug authors --shuffle_groups 1 --adv_optimizer fresh`); flags
given on the command line win. See the README, "Pretraining".
"""

import sys

import videomoco.cli
from videomoco.engine.config import authors_flags

if __name__ == "__main__":
    sys.exit(videomoco.cli.main(["pretrain", *authors_flags(), *sys.argv[1:]]))
