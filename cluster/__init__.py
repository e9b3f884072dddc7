"""Ray cluster access: the embedded local cluster and connections to existing ones."""

import os

# Ray reads this when it is imported: under `uv run` it would otherwise build a fresh virtualenv
# for every worker from a copy of the working directory instead of using this environment.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
