"""A grid sweep spec as Hydra multirun overrides, one per line: `label=hard,soft,cot`.

    python recipes/sweep_grid.py sweeps/label_x_constitution.yaml

Only `method: grid` has a meaning without W&B's controller; logger.mode is left to the command line
(a local run stays offline).
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


if __name__ == "__main__":
    main(sys.argv[1])
