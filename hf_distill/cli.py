"""The `hf-distill` command (`scripts/distill.py` in a checkout): a recipe and the flags that override it, then the pipeline.

hf-distill --list-recipes
hf-distill --recipe minilm-rotten-tomatoes                   # the offline quick start
hf-distill --recipe distilbert --teacher ./bert --dataset "corpus/*.txt" --max_steps 1000
hf-distill --recipe my-recipe.yaml                           # a recipe file of your own
"""

from __future__ import annotations

import logging
import os
import sys

import transformers

#: What `pip install 'hf_distill[pipeline]'` adds (import names).
_PIPELINE_MODULES = {"matplotlib", "PIL"}


class _DropLine(logging.Filter):
    """Drops one known log line that tells the user nothing they can act on."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_console() -> None:
    """Leave on the console only what a user can act on: progress, the stages, warnings about their run.

    DeepSpeed, when installed, is imported by the Trainer and says at import that it picked the CPU: the run
    is on the CPU either way (the report records the machine).
    """
    logging.getLogger("DeepSpeed").addFilter(_DropLine("Setting accelerator to CPU"))


def main(argv: list[str] | None = None) -> int:
    """Parse the recipe and flags, run every stage, print the table. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:  # the pipeline's own dependencies are an extra: the trainer needs none of them
        from .pipeline import (
            RECIPES_DIR,
            UsageError,
            available_recipes,
            parse_args,
            report_lines,
            run_pipeline,
            run_seeds,
        )
        from .pipeline.kinds import kinds_report_lines, kinds_seeds_report_lines, run_student_kinds
        from .pipeline.seeds import seeds_report_lines
    except ModuleNotFoundError as error:
        if error.name not in _PIPELINE_MODULES:
            raise
        print(
            f"hf-distill needs {error.name!r}, which the pipeline uses and the trainer does not: install the "
            "pipeline extra with `pip install 'hf_distill[pipeline]'`",
            file=sys.stderr,
        )
        return 1
    if "--list-recipes" in argv:
        recipes = available_recipes()
        width = max(map(len, recipes)) + 2
        for name, description in recipes.items():
            print(f"{name:<{width}}{description}")
        print("\nRun one with `hf-distill --recipe NAME` (flags after it override it), or pass a YAML file's path.")
        print(f"The shipped recipes are in {RECIPES_DIR}.")
        return 0
    _quiet_console()
    try:
        args, config, recipe = parse_args(argv)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        transformers.logging.set_verbosity_warning()
        if args.seeds:
            report = run_seeds(args, config, args.seeds, recipe)
            lines = kinds_seeds_report_lines(report) if args.student_kinds else seeds_report_lines(report)
            print("\n" + "\n".join(lines))
            print(
                f"\nEach seed's student is in <run>/student; the report over all is in {config.output_dir}/report.md"
            )
            return 0
        if args.student_kinds:
            report = run_student_kinds(args, config, recipe)
            print("\n" + "\n".join(kinds_report_lines(report)))
            print(f"\nEach kind's student is in {config.output_dir}/<kind>/student; the report in "
                  f"{config.output_dir}/report.md")  # fmt: skip
            return 0
        report = run_pipeline(args, config, recipe)
    except UsageError as error:  # the user's to fix (a flag, a recipe, a name): one line, no traceback, no usage
        print(f"hf-distill: error: {error}", file=sys.stderr)
        return 2
    print("\n" + "\n".join(report_lines(report)))
    print(f"\nStudent saved to {report['student_dir']}; report in {os.path.join(config.output_dir, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
