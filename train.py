"""The authors' entry point, kept so their command lines work verbatim: `python train.py [flags] DATA`.

Forwards to `videomoco pretrain` (see the README, "Pretraining").
"""

import sys

import videomoco.cli

if __name__ == "__main__":
    sys.exit(videomoco.cli.main(["pretrain", *sys.argv[1:]]))
