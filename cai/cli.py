"""The command line: `python train.py [overrides]` or `cai-train [overrides]`; everything happens in cai.pipeline.run(cfg)."""

import sys

import hydra
from omegaconf import DictConfig

import cai
import cai.config  # noqa: F401  (registers the typed schemas the YAML files build on)
from cai.errors import CaiError, Interrupted, raise_on_signals


# conf/ at the top of a checkout, or inside the package in a wheel (cai.CONF). A user adds their own
# options with `--config-dir DIR` or `hydra.searchpath=[file://DIR]`, without editing this one.
@hydra.main(version_base=None, config_path=str(cai.CONF), config_name="train")
def train(cfg: DictConfig) -> float | None:
    """One run; returns the value `objective` names (for Hydra's sweepers: `hydra/sweeper=optuna`)."""
    # Imported here, not at the top: `--help`, `--cfg` and `--info` are answered by Hydra before this
    # function runs, so they never pay for torch, Lightning and transformers (seconds of CPU).
    from cai.pipeline import objective, run

    try:
        with raise_on_signals():
            return objective(cfg, run(cfg))
    except CaiError as err:  # bad input, a damaged file, a full disk, an interruption: one clear line, no traceback
        close_progress_bars()
        if err.exit_code == 1:
            sys.exit(f"error: {err}")
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Interrupted as sig:  # before any stage started (the pipeline names the stage otherwise)
        close_progress_bars()
        print(f"error: interrupted by {sig.name} before any stage ran; nothing was written", file=sys.stderr)
        sys.exit(128 + sig.signum)


def close_progress_bars() -> None:
    """Close the bars an error left open now, so the error line is the last line printed (not a bar's clean-up)."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main() -> None:
    """`python train.py` / `cai-train`: refuse what Hydra would compose without complaint, then run."""
    for arg in sys.argv[1:]:
        name, _, options = arg.lstrip("+~").partition("=")
        if name == "model" and "policy" in options.split(","):  # `model=policy` and a sweep over it alike
            sys.exit(
                "error: model=policy: 'policy' is an option for model@feedback_model= and model@pm_model= (follow the policy); "
                "give the policy a real model, e.g. model=smollm2_135m or model=hf model.name_or_path=DIR"
            )
    train()
