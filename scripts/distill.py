"""Distil a teacher into a student with a recipe from recipes/, stage by stage.

python scripts/distill.py --recipe minilm-rotten-tomatoes            # offline quick start
python scripts/distill.py --recipe distilbert --max_steps 1000       # flags override the recipe
python scripts/distill.py --help                                     # every flag, and the recipes
"""

from hf_distill.pipeline import main

if __name__ == "__main__":
    main()
