"""The package as a user installs it: a wheel (not the checkout) with its recipes and the `hf-distill` command."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_assets import write_encoder_teacher, write_sentiment_dataset

from hf_distill.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["setup.cfg", "pyproject.toml", "README.md", "LICENSE", "hf_distill", "recipes"]
# Lines a run printed before: none of them is something the user can act on.
NOISE = ["Setting accelerator to CPU", "pin_memory", "requires torchvision", "LOAD REPORT"]


def run(command, cwd, env=None):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from the package's own files, installed (not editable) into a fresh virtual environment.

    The environment sees the dependencies already installed here (torch, transformers...), not this checkout.
    """
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)], root)  # fmt: skip
    (wheel,) = (root / "dist").glob("hf_distill-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    python = venv / "bin" / "python"
    # The dependencies are those of the interpreter running the tests: in a virtual environment, that environment's
    # (`venv --system-site-packages` would give its base interpreter's instead), in a conda prefix or a plain
    # install, its own. Each of its site folders is added after the new environment's own, so the wheel comes first.
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).strip()
    folders = "".join(f"import site; site.addsitedir({folder!r})\n" for folder in site.getsitepackages())
    Path(purelib, "running_interpreter.pth").write_text(folders)
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)], root)  # fmt: skip
    outside = root / "elsewhere"  # a working folder with no checkout in sight
    outside.mkdir()
    return venv, outside


@pytest.mark.slow  # builds and installs a wheel into a new environment (a minute)
def test_the_wheel_installs_the_package_its_recipes_and_the_command(installed):
    venv, outside = installed
    where = run([str(venv / "bin" / "python"), "-c", "import hf_distill.pipeline as p; print(p.__file__, p.RECIPES_DIR)"], outside)  # fmt: skip
    # The line printed (torchao, when installed, logs that its CUDA kernels do not load on a machine without CUDA).
    module, recipes = next(line for line in where.splitlines() if line.endswith("recipes")).split()
    site_packages = str(venv / "lib")
    assert module.startswith(site_packages) and recipes.startswith(site_packages), where
    listing = run([str(venv / "bin" / "hf-distill"), "--list-recipes"], outside)
    for name in ("distilbert", "minilm-rotten-tomatoes", "vit-fashion-mnist", "vit-mobilenet", "minilm-mlm"):
        assert f"\n{name} " in f"\n{listing}"
    usage = run([str(venv / "bin" / "hf-distill"), "--help"], outside)
    assert "--recipe" in usage and "--list-recipes" in usage and "minilm-rotten-tomatoes" in usage


@pytest.mark.slow  # builds and installs a wheel into a new environment (a minute)
def test_a_shipped_recipe_runs_from_the_wheel_outside_the_checkout_and_prints_only_what_matters(installed):
    venv, outside = installed
    teacher = write_encoder_teacher(str(outside / "encoder"))
    data = write_sentiment_dataset(str(outside / "data"))
    output = run(
        [str(venv / "bin" / "hf-distill"), "--recipe", "minilm-rotten-tomatoes", "--teacher", teacher, "--dataset", data,
         "--output_dir", "run", "--student_num_layers", "2", "--max_train_samples", "24",
         "--teacher_max_train_samples", "24", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
         "--teacher_num_train_epochs", "1", "--latency_repeats", "1", "--latency_batch_sizes", "1", "4"],
        outside,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert "# Distillation report: minilm-rotten-tomatoes" in output and "| student |" in output
    assert (outside / "run" / "student" / "model.safetensors").is_file()
    assert [line for line in NOISE if line in output] == []


@pytest.mark.slow  # a fresh interpreter
def test_the_command_names_the_extra_when_the_pipeline_dependencies_are_missing():
    code = "import sys; sys.modules['matplotlib'] = None; from hf_distill.cli import main; sys.exit(main(['--help']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pip install 'hf_distill[pipeline]'" in result.stderr and "'matplotlib'" in result.stderr


def test_list_recipes_prints_every_recipe_with_its_description(capsys):
    from hf_distill.pipeline import available_recipes

    assert main(["--list-recipes"]) == 0
    printed = capsys.readouterr().out
    recipes = available_recipes()
    lines = {line.split()[0]: line for line in printed.splitlines() if line.split() and line.split()[0] in recipes}
    assert sorted(lines) == sorted(recipes)
    columns = {line.index(recipes[name]) for name, line in lines.items()}  # every description starts in one column
    assert len(columns) == 1 and min(columns) > max(map(len, recipes))
