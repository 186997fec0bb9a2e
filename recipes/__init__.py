"""The recipes that ship with hf_distill, installed as `hf_distill.recipes`: one YAML file each, named by its file.

A recipe holds only what differs from the defaults of `PipelineArguments` and `DistillationConfig`; its first line,
a `# ...` comment, is the description `hf-distill --list-recipes` prints.
"""
