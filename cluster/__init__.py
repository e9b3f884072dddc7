"""Ray cluster access: the embedded local cluster and connections to existing ones."""

import os

# Ray reads this when it is imported: under `uv run` it would otherwise build a fresh virtualenv
# for every worker from a copy of the working directory instead of using this environment.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train V2 sends print() in a training function to its logger, even inside
# contextlib.redirect_stdout (the silenced pycocotools output of a validation during training
# would flood the log): our workers print to stdout like any process; Ray forwards it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
