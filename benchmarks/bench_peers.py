"""Benchmark cai against TRL on the same work, alternating in one run, and print each pair with its ratio.

    python benchmarks/bench_peers.py [ROOT] [--repeats R] [--precision fp32|bf16|both]   # TRL: pip install -e ".[dev]"

The same model (the embedded SmolLM2-135M-Instruct), data, lengths, batch sizes, learning rates and steps:
  SFT  cai's sft stage vs TRL's SFTTrainer on the examples cai trains on (`sft/<key>/data/train.jsonl`, as
       prompt-completion rows so that TRL's loss is on the answer only, as cai's): training tokens/s, peak RSS.
  PM   cai's pm stage (label=hard) vs TRL's RewardTrainer on the same comparisons (`label/<key>/preferences.jsonl`),
       both from the embedded model: comparisons/s, peak RSS, and both PMs' accuracy on the same held-out
       human comparisons (the second half of the shared hh-rlhf dev split, when it is there).
  RL   a cai PPO iteration (ppo.advantage=grpo and gae) vs a TRL GRPOTrainer generation round, both from cai's
       SFT model with cai's PM as the reward, the same prompts, 4 answers per prompt, 16 answers a round, 48 new
       tokens, one update pass over them in one optimizer step (the quickstart's ppo_epochs=1, minibatch 16; TRL's
       num_iterations=1): seconds per iteration (cai: generation/scoring/update) and peak RSS.
cai runs with its defaults: the prompt that a comparison's two answers (PM) or a prompt's 4 answers (RL) share
is computed once (`pm.share_prompt`, `ppo.share_prompt`); TRL computes every sequence whole.
Precision is part of the work: TRL's configs default to bf16 autocast (`bf16=None` means True), cai's training
to float32 on a CPU. Each precision is compared with itself: fp32 (TRL bf16=False, cai trainer.precision=32-true)
and bf16 (TRL's default, cai trainer.precision=bf16-mixed); bf16 autocast is fast only on CPUs with native bf16.
Each measured run is its own process (its peak RSS is its own, reset after the imports); cai and TRL
alternate, R times, and the median of each is reported. Writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cai

RESULTS = Path(__file__).parent / "results" / "peers.json"
HH_DEV = Path(os.environ.get("CAI_TEST_DATA") or cai.ROOT.parent / "shared" / "data") / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
# The work both sides do: the quickstart's data, with nothing held out (TRL's trainers here validate nothing).
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}  # name -> cai's trainer.precision (TRL: bf16=False / True)
SFT = ["sft.val_fraction=0", "sft.epochs=3", "sft.batch_size=8", "sft.lr=2e-5", "sft.max_length=384"]
PM = ["label=hard", "pm.val_fraction=0", "pm.epochs=2", "pm.batch_size=8", "pm.lr=2e-5", "pm.max_length=384"]
RL = [
    "ppo.iterations=3",
    "ppo.rollouts=16",
    "ppo.samples_per_prompt=4",
    "ppo.max_new_tokens=48",
    "ppo.lr=1e-5",
    "ppo.kl_coef=0.05",
    "ppo.ppo_epochs=1",
    "ppo.minibatch_size=16",
]
RL_ROUNDS, K = 3, 4


def train(root: Path, *args: str) -> None:
    """`python train.py ARGS` in ROOT (logger off); raises if it fails."""
    env = {**os.environ, "CAI_ROOT": str(root)}
    done = subprocess.run([sys.executable, str(cai.ROOT / "train.py"), "logger=none", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"python train.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def stage_dir(root: Path, stage: str, *args: str) -> Path:
    """Where this config's stage output lives (its lineage key), without running anything."""
    from hydra import compose, initialize_config_dir

    from cai.pipeline import stage_path

    with initialize_config_dir(config_dir=str(cai.CONF), version_base=None):
        cfg = compose("train", overrides=[f"paths.root={root}", "logger=none", *args])
    return stage_path(cfg, stage)


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def cai_run(root: Path, stage: str, args: list[str]) -> dict:
    """One timed cai stage, computed afresh (its earlier output moved away)."""
    path = stage_dir(root, stage, *args)
    shutil.rmtree(path, ignore_errors=True)
    train(root, f"stage={stage}", *args)
    m = manifest(path)
    return {"counts": m["counts"], "usage": m["usage"], "path": str(path)}


def trl_run(kind: str, root: Path, precision: str) -> dict:
    """One timed TRL run, in its own process (`--trl KIND OUT PRECISION`)."""
    out = Path(tempfile.mkdtemp(prefix=f"trl-{kind}-"))
    done = subprocess.run([sys.executable, __file__, str(root), "--trl", kind, str(out), precision], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"TRL {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


# --- the TRL side, run in its own process ------------------------------------------------------------


def peak_gb() -> float:
    from cai.usage import peak_rss_bytes

    return round(peak_rss_bytes() / 2**30, 2)


def trl_common(
    out: Path, precision: str, warmup: int, epochs: float | None = None, steps: int | None = None, schedule: str = "cosine"
) -> dict:
    """Settings both sides share: the CPU at the given precision, gradient checkpointing, AdamW without weight
    decay, seed 0, cai's schedule (cosine after int(10% of the steps) of warmup for SFT and the PM, constant for PPO)."""
    return {
        "bf16": precision == "bf16",
        "output_dir": str(out),
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "gradient_checkpointing": True,
        "lr_scheduler_type": schedule,
        "warmup_steps": warmup,
        "weight_decay": 0.0,
        "dataloader_num_workers": 0,
        **({"num_train_epochs": epochs} if epochs else {}),
        **({"max_steps": steps} if steps else {}),
    }


def trl_sft(root: Path, out: Path, precision: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from cai.artifacts import read_jsonl
    from cai.usage import _reset_peak_rss

    rows = read_jsonl(stage_dir(root, "sft", *cai_args(precision, SFT)) / "data" / "train.jsonl")
    data = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    model = embedded_dir()
    _reset_peak_rss()
    args = SFTConfig(
        **trl_common(out, precision, warmup=1, epochs=3),
        per_device_train_batch_size=8,
        learning_rate=2e-5,
        max_length=384,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data)
    tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset) * 3
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "train_tokens": tokens, "train_tokens_per_s": tokens / seconds, "peak_rss_gb": peak_gb()}


def trl_pm(root: Path, out: Path, precision: str) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from cai.artifacts import read_jsonl
    from cai.usage import _reset_peak_rss

    rows = read_jsonl(stage_dir(root, "label", *cai_args(precision, SFT, PM)) / "preferences.jsonl")
    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    model = embedded_dir()
    _reset_peak_rss()
    args = RewardConfig(**trl_common(out, precision, warmup=0, epochs=2), per_device_train_batch_size=8, learning_rate=2e-5, max_length=384)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    trainer.save_model(str(out / "model"))
    trainer.processing_class.save_pretrained(str(out / "model"))
    n = len(data) * 2  # two epochs
    return {"seconds": seconds, "comparisons": n, "comparisons_per_s": n / seconds, "peak_rss_gb": peak_gb(), "model": str(out / "model")}


def trl_rl(root: Path, out: Path, precision: str) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from cai.usage import _reset_peak_rss

    prompts = [{"prompt": [{"role": "user", "content": p}]} for p in train_prompts()]
    sft, pm = stage_dir(root, "sft", *cai_args(precision, SFT)) / "model", stage_dir(root, "pm", *cai_args(precision, SFT, PM)) / "model"
    _reset_peak_rss()
    args = GRPOConfig(
        **trl_common(out, precision, warmup=0, steps=RL_ROUNDS, schedule="constant"),
        per_device_train_batch_size=16,
        num_generations=K,
        num_iterations=1,  # each round's answers trained on once, as cai's ppo_epochs=1
        max_completion_length=48,
        learning_rate=1e-5,
        beta=0.05,
        temperature=1.0,
        top_p=1.0,
    )
    trainer = GRPOTrainer(model=str(sft), reward_funcs=str(pm), args=args, train_dataset=Dataset.from_list(prompts))
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rounds": RL_ROUNDS, "seconds_per_iteration": seconds / RL_ROUNDS, "peak_rss_gb": peak_gb()}


def embedded_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF checkpoint directory (cai converts it once)."""
    from hydra import compose, initialize_config_dir

    from cai.config import instantiate

    with initialize_config_dir(config_dir=str(cai.CONF), version_base=None):
        cfg = compose("train", overrides=["logger=none"])
    return str(instantiate(cfg.model).local_dir())


def train_prompts() -> list[str]:
    """The quickstart's train prompts, red-team and helpful, as cai's PPO samples them."""
    from cai.data import load_prompts

    return [p.text for kind, n in (("red_team", 24), ("helpful", 8)) for p in load_prompts(kind, "builtin", "train", n, 0)]


def cai_args(precision: str, *groups: list[str]) -> list[str]:
    """cai's overrides for this precision and these groups of settings."""
    return [f"trainer.precision={PRECISION[precision]}", *(a for g in groups for a in g)]


# --- the comparison ---------------------------------------------------------------------------------


def held_out(root: Path) -> Path | None:
    """The second half of the shared hh-rlhf dev split (the first is for tuning), or None without it."""
    if not HH_DEV.exists():
        print(f"no held-out comparisons at {HH_DEV} (set CAI_TEST_DATA to the shared data/ folder): no PM accuracy row", flush=True)
        return None
    import gzip

    from cai.artifacts import write_jsonl

    rows = [json.loads(line) for line in gzip.open(HH_DEV, "rt", encoding="utf-8") if line.strip()]
    path = root / "hh-dev-second-half.jsonl"
    write_jsonl(path, rows[len(rows) // 2 :][:200])
    return path


def accuracy(pm_dir: str | Path, data: Path | None) -> float | None:
    if data is None:
        return None
    from cai.reward import PreferenceModel, hh_accuracy

    pm, tok = PreferenceModel.load(pm_dir)
    return round(hh_accuracy(pm, tok, str(data), 384, 0, 8)["accuracy"], 4)


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def compare(root: Path, precision: str, repeats: int) -> dict:
    """Every pair at one precision, cai and TRL alternating (a slow minute of the machine falls on both)."""
    sft, pm = cai_args(precision, SFT), cai_args(precision, SFT, PM)
    runs: dict[str, list[dict]] = {k: [] for k in ("sft cai", "sft trl", "pm cai", "pm trl", "rl cai grpo", "rl trl", "rl cai gae")}
    for r in range(repeats):
        print(f"{precision} round {r + 1}/{repeats}: SFT", flush=True)
        runs["sft cai"].append(cai_run(root, "sft", sft))
        runs["sft trl"].append(trl_run("sft", root, precision))
    train(root, "stage=pairs", *sft)
    train(root, "stage=label", *pm)
    for r in range(repeats):
        print(f"{precision} round {r + 1}/{repeats}: PM", flush=True)
        runs["pm cai"].append(cai_run(root, "pm", pm))
        runs["pm trl"].append(trl_run("pm", root, precision))
    for r in range(repeats):
        print(f"{precision} round {r + 1}/{repeats}: RL", flush=True)
        runs["rl cai grpo"].append(cai_run(root, "ppo", [*pm, *RL, "ppo.advantage=grpo"]))
        runs["rl trl"].append(trl_run("rl", root, precision))
        runs["rl cai gae"].append(cai_run(root, "ppo", [*pm, *RL, "ppo.advantage=gae"]))
    return runs


def main(root: Path, repeats: int, precisions: list[str]) -> None:
    print(f"preparing {root} (not timed): the SL data", flush=True)
    train(root, "stage=sl_data")
    data = held_out(root)
    results = {p: summarise(compare(root, p, repeats), data) for p in precisions}
    for p, res in results.items():
        show(p, res, data)
    RESULTS.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/bench_peers.py --repeats {repeats} --precision {'both' if len(precisions) > 1 else precisions[0]}",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{os.cpu_count()} CPU cores ({cpu_name()}), the embedded SmolLM2-135M-Instruct",
                "versions": {p: version(p) for p in ("cai", "trl", "torch", "transformers", "lightning")},
                "repeats": repeats,
                "by_precision": results,
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {RESULTS} (root {root})")


def ppo_split(run: dict) -> dict[str, float]:
    history = json.loads((Path(run["path"]) / "history.json").read_text())
    keys = ("generation_s", "scoring_s", "update_s")
    return {k: round(statistics.mean(h[f"ppo/time/{k}"] for h in history), 2) for k in keys}


def summarise(runs: dict[str, list[dict]], data: Path | None) -> dict:
    """Medians of each side, the rows (measure, cai, TRL, higher is faster) and the runs without paths."""
    sft_cai = [{**r["counts"], "peak_rss_gb": r["usage"]["peak_rss_gb"]} for r in runs["sft cai"]]
    pm_cai = [{**r["counts"], "peak_rss_gb": r["usage"]["peak_rss_gb"]} for r in runs["pm cai"]]
    for r in pm_cai:
        r["comparisons_per_s"] = pm_rate(r)
    rows = [
        ("SFT training tokens/s", median(sft_cai, "train_tokens_per_s"), median(runs["sft trl"], "train_tokens_per_s"), True),
        ("SFT peak RSS GiB", median(sft_cai, "peak_rss_gb"), median(runs["sft trl"], "peak_rss_gb"), None),
        ("PM comparisons/s", median(pm_cai, "comparisons_per_s"), median(runs["pm trl"], "comparisons_per_s"), True),
        ("PM peak RSS GiB", median(pm_cai, "peak_rss_gb"), median(runs["pm trl"], "peak_rss_gb"), None),
    ]
    trl_it, trl_peak = median(runs["rl trl"], "seconds_per_iteration"), median(runs["rl trl"], "peak_rss_gb")
    split = {}
    for name in ("rl cai grpo", "rl cai gae"):
        rs = runs[name]
        it = statistics.median(per_iteration(r) for r in rs)
        rows.append((f"RL s/iteration, {name[3:]} vs TRL GRPO", it, trl_it, False))
        rows.append((f"RL peak RSS GiB, {name[3:]}", statistics.median(r["usage"]["peak_rss_gb"] for r in rs), trl_peak, None))
        split[name[3:]] = ppo_split(rs[-1])
    acc = {"cai": accuracy(runs["pm cai"][-1]["path"] + "/model", data), "trl": accuracy(runs["pm trl"][-1]["model"], data)}
    return {
        "rows": [{"measure": n, "cai": round(c, 3), "trl": round(t, 3), "cai/trl speed": speed(c, t, h)} for n, c, t, h in rows],
        "per_round_speed": round_speeds(runs),
        "rl_split": split,
        "pm_accuracy": {"data": data.name if data else None, "comparisons": 200 if data else 0, **acc},
        "runs": strip_paths(runs),
    }


def round_speeds(runs: dict[str, list[dict]]) -> dict[str, list[float | None]]:
    """cai/TRL speed of each round: a cai run and the TRL run beside it share the machine's moment, so their
    spread shows how far the machine's noise moves the medians' ratio."""
    pairs = {
        "SFT": ([r["counts"]["train_tokens_per_s"] for r in runs["sft cai"]], [r["train_tokens_per_s"] for r in runs["sft trl"]], True),
        "PM": (
            [pm_rate(r["counts"]) for r in runs["pm cai"]],
            [r["comparisons_per_s"] for r in runs["pm trl"]],
            True,
        ),
        "RL grpo": ([per_iteration(r) for r in runs["rl cai grpo"]], [r["seconds_per_iteration"] for r in runs["rl trl"]], False),
        "RL gae": ([per_iteration(r) for r in runs["rl cai gae"]], [r["seconds_per_iteration"] for r in runs["rl trl"]], False),
    }
    return {name: [speed(c, t, faster) for c, t in zip(cai, trl)] for name, (cai, trl, faster) in pairs.items()}


def pm_rate(counts: dict) -> float:
    """A cai PM run's comparisons/s, from its manifest's counts: two epochs over its train comparisons."""
    return counts["train_comparisons"] * 2 / counts["seconds"]


def per_iteration(run: dict) -> float:
    """A cai PPO run's seconds per iteration."""
    return run["counts"]["seconds"] / run["counts"]["iterations"]


def speed(cai_value: float, trl_value: float, higher_is_faster: bool | None) -> float | None:
    """How many times faster cai is (None for a memory row)."""
    if higher_is_faster is None:
        return None
    return round(cai_value / trl_value if higher_is_faster else trl_value / cai_value, 3)


def show(precision: str, res: dict, data: Path | None) -> None:
    print(f"\n== cai vs TRL {version('trl')} at {precision}, {os.cpu_count()} CPU cores, the embedded SmolLM2-135M, medians")
    print(f"{'measure':44s} {'cai':>10s} {'TRL':>10s} {'cai/TRL speed':>14s}")
    for row in res["rows"]:
        ratio = row["cai/trl speed"]
        print(f"{row['measure']:44s} {row['cai']:10.2f} {row['trl']:10.2f} {'' if ratio is None else f'x{ratio:.2f}':>14s}")
    print(
        "cai/TRL speed of each round: "
        + "; ".join(f"{k} " + ", ".join(f"x{v:.2f}" for v in vs) for k, vs in res["per_round_speed"].items())
    )
    for name, split in res["rl_split"].items():
        print(f"  {name} split (s): " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    if data is not None:
        acc = res["pm_accuracy"]
        print(f"PM accuracy on {data.name} (200 human comparisons): cai {acc['cai']}, TRL {acc['trl']}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def strip_paths(value):
    """The runs without this machine's paths (the results file is committed)."""
    if isinstance(value, dict):
        return {k: strip_paths(v) for k, v in value.items() if k not in ("path", "model")}
    if isinstance(value, list):
        return [strip_paths(v) for v in value]
    return value


def version(package: str) -> str:
    from importlib.metadata import version as v

    return v(package)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", help="artifacts root (a temp dir by default)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of each comparison")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both", help="both sides at this precision")
    parser.add_argument("--trl", nargs=3, metavar=("KIND", "OUT", "PRECISION"), help=argparse.SUPPRESS)  # one TRL run, own process
    a = parser.parse_args()
    root = Path(a.root or tempfile.mkdtemp(prefix="cai-peers-")).resolve()
    if a.trl:
        kind, out, precision = a.trl[0], Path(a.trl[1]), a.trl[2]
        (out / "result.json").write_text(json.dumps({"sft": trl_sft, "pm": trl_pm, "rl": trl_rl}[kind](root, out, precision)))
    else:
        main(root, a.repeats, ["fp32", "bf16"] if a.precision == "both" else [a.precision])
