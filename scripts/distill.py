"""Distil a teacher into a student with a recipe, stage by stage: the `hf-distill` command, run from a checkout.

python scripts/distill.py --recipe minilm-rotten-tomatoes            # offline quick start
python scripts/distill.py --recipe distilbert --max_steps 1000       # flags override the recipe
python scripts/distill.py --list-recipes                             # the recipes that ship with hf_distill
python scripts/distill.py --help                                     # every flag, and the recipes
"""

import sys

from hf_distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
