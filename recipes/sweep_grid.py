"""A grid sweep spec as Hydra multirun overrides, one per line: `label=hard,soft,cot`.

    python recipes/sweep_grid.py sweeps/label_x_constitution.yaml

Only `method: grid` has a meaning without W&B's controller; logger.mode is left to the command line
(a local run stays offline). Overrides written into the spec's command (not `${...}`) are kept.
"""

from __future__ import annotations

import sys

import yaml


def main(path: str) -> None:
    spec = yaml.safe_load(open(path, encoding="utf-8"))
    if spec.get("method") != "grid":
        sys.exit(f"error: {path}: method '{spec.get('method')}' needs W&B's sweep controller; only a grid runs locally")
    for key, p in spec["parameters"].items():
        if key == "logger.mode":
            continue
        values = p["values"] if "values" in p else [p["value"]]
        print(f"{key}={','.join(str(v) for v in values)}")
    for arg in spec.get("command", []):  # overrides the spec gives every run (model@feedback_model=...)
        if not arg.startswith("${"):
            print(arg)


if __name__ == "__main__":
    main(sys.argv[1])
