"""The distillation pipeline behind the `hf-distill` command, one public function per stage.

from hf_distill.pipeline import parse_args, prepare_data, prepare_teacher, make_student, distill, ...
args, config, recipe = parse_args(["--recipe", "minilm-rotten-tomatoes", "--max_train_samples", "500"])
report = run_pipeline(args, config, recipe)     # or call the stages one by one, as run_pipeline does:
data = prepare_data(args.data_settings, config.seed)   # each stage takes its group of the settings
"""

from .arguments import PipelineArguments
from .command_line import RECIPES_DIR, UsageError, available_recipes, load_recipe, parse_args
from .data import PreparedData, load_processor, mask_once, prepare_data
from .evaluation import count_parameters, describe_models, evaluate_model, measure_latency
from .kinds import run_student_kinds
from .models import (
    build_student,
    default_student_layers,
    distill,
    fresh_student,
    load_initial_teacher,
    prepare_teacher,
    save_atomically,
)
from .report import build_report, model_card, push_student, report_lines, save_student, write_report
from .run import losses_with_layer_map, make_student, run_pipeline
from .seeds import run_seeds
from .settings import (
    DataSettings,
    DistillationSettings,
    MeasurementSettings,
    RefinementSettings,
    StudentSettings,
    TeacherSettings,
)
from .sources import OFFLINE_SOURCES, load_raw_dataset
from .spread import combine_reports

__all__ = [
    "DataSettings",
    "DistillationSettings",
    "MeasurementSettings",
    "OFFLINE_SOURCES",
    "PipelineArguments",
    "RECIPES_DIR",
    "PreparedData",
    "RefinementSettings",
    "StudentSettings",
    "TeacherSettings",
    "UsageError",
    "available_recipes",
    "build_report",
    "build_student",
    "combine_reports",
    "count_parameters",
    "default_student_layers",
    "describe_models",
    "distill",
    "evaluate_model",
    "fresh_student",
    "load_initial_teacher",
    "load_processor",
    "load_raw_dataset",
    "load_recipe",
    "losses_with_layer_map",
    "make_student",
    "mask_once",
    "measure_latency",
    "model_card",
    "parse_args",
    "prepare_data",
    "prepare_teacher",
    "push_student",
    "report_lines",
    "run_pipeline",
    "run_seeds",
    "run_student_kinds",
    "save_atomically",
    "save_student",
    "write_report",
]
