"""The one parser path of `hf-distill`: dataclass defaults < recipe YAML < command line, and the recipes it reads.

    args, config, recipe = parse_args(["--recipe", "minilm-rotten-tomatoes", "--learning_rate", "1e-4"])

Every mistake a user can make here (an unknown or misspelt flag or recipe key, a value of the wrong type in a flag
or in a recipe file, an unknown recipe) is a `UsageError`: one message that names the cause, the nearest valid
names and the fix, which the command prints on its own line instead of a traceback or the whole usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from ..config import DistillationConfig
from .arguments import PipelineArguments, UsageError

#: The recipes that ship with the package (the top-level `recipes/` folder, installed as `hf_distill.recipes`): one
#: YAML file each, the file name is the recipe name.
RECIPES_DIR: Traversable = files("hf_distill.recipes")


def nearest(name: str, choices: list[str] | set[str], prefix: str = "") -> str:
    """`" (did you mean X or Y?)"` for the valid names closest to `name`, or nothing when none is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + match for match in close)}?)" if close else ""


def available_recipes(recipes_dir: Traversable = RECIPES_DIR) -> dict[str, str]:
    """Recipe name -> the one-line description on the first line of its file (`# ...`)."""
    recipes = {}
    for path in sorted((p for p in recipes_dir.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        recipes[path.name[: -len(".yaml")]] = (
            first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        )
    return recipes


def recipe_listing() -> str:
    """One line per shipped recipe: its name and description (what `--help` and `--list-recipes` print)."""
    recipes = available_recipes()
    width = max(map(len, recipes)) + 2
    return "\n".join(f"  {name:<{width}}{line}" for name, line in recipes.items())


def field_names() -> set[str]:
    """Every setting a recipe or a flag may set."""
    return {f.name for cls in (PipelineArguments, DistillationConfig) for f in dataclasses.fields(cls) if f.init}


def load_recipe(name: str, recipes_dir: Traversable = RECIPES_DIR) -> dict[str, Any]:
    """The settings a recipe changes from the defaults: a shipped recipe by name, or a YAML file by path; unknown
    recipes and keys are errors."""
    path: Path | Traversable = Path(name)
    if not path.is_file():
        recipes = available_recipes(recipes_dir)
        if name not in recipes:
            raise UsageError(
                f"unknown recipe {name!r}{nearest(name, list(recipes))}; choose one of: {', '.join(recipes)} (or a "
                "path to a YAML file)"
            )
        path = recipes_dir / f"{name}.yaml"
    settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(settings, dict):
        raise UsageError(f"recipe {path} must be a mapping of setting to value")
    valid = field_names()
    unknown = sorted(set(settings) - valid)
    if unknown:
        hints = "".join(f"; {key}{nearest(key, valid)}" for key in unknown)
        raise UsageError(
            f"recipe {path} sets unknown keys {unknown}{hints}: fix or remove them (`hf-distill --help` lists every "
            "setting)"
        )
    return settings


def parse_args(argv: list[str] | None = None) -> tuple[PipelineArguments, DistillationConfig, str | None]:
    """Parse `--recipe NAME` and the flags that override it. Returns the two argument sets and the recipe name."""
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe", default=None)
    known, _ = recipe_parser.parse_known_args(argv)
    parser = HfArgumentParser(
        (PipelineArguments, DistillationConfig),
        description="Distil a teacher into a student, stage by stage: teacher, student, distill, evaluate, "
        "report, save (and push).",
        epilog=f"recipes (--recipe NAME; flags after it override the recipe):\n{recipe_listing()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--recipe", default=None, help="A recipe that ships with hf_distill (listed below) or the path of a YAML file."
    )
    parser.add_argument("--list-recipes", action="store_true", help="Print the recipes that ship with hf_distill.")
    settings: dict[str, Any] = {}
    if known.recipe is not None:
        settings = load_recipe(known.recipe)
        settings.setdefault("output_dir", str(Path("runs") / Path(known.recipe).stem))
        parser.set_defaults(**settings)
    given = {arg.split("=", 1)[0][2:] for arg in (argv or []) if arg.startswith("--")}

    def error(message: str) -> NoReturn:
        # argparse would print the whole usage and exit; a value from the recipe would be blamed on a flag.
        flag = re.match(r"argument --(\w+)", message)
        if flag and flag.group(1) in settings and flag.group(1) not in given:
            message = f"recipe {known.recipe}: {flag.group(1)}: {message.split(': ', 1)[-1]}"
        raise UsageError(f"{message}: fix the value (`hf-distill --help` gives each setting's type)")

    parser.error = error
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
    except UsageError:
        raise
    except ValueError as problem:  # a check of the settings themselves (PipelineArguments, DistillationConfig)
        raise UsageError(str(problem)) from problem
    unknown = [arg for arg in remaining if arg.startswith("--")]
    if remaining:
        flags = field_names() | {"recipe", "list-recipes"}
        hints = "".join(f"; {arg}{nearest(arg[2:].split('=')[0], flags, '--')}" for arg in unknown)
        raise UsageError(
            f"unknown flags {unknown or remaining}{hints}: fix or remove them (`hf-distill --help` lists every flag)"
        )
    pipeline_args, config, _recipe_namespace = parsed
    return pipeline_args, config, known.recipe
