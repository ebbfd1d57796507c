"""The training stages, each a `build_task` for the shared loop (emi.engine) and a `main(argv)` entry point.

accelerate launch -m emi.stages.stage1 --config FILE [--resume latest] [section.key=value ...]
emi train stage1 --config FILE ...          # the same, from the `emi` command
"""
