"""The GPU check: one command that says whether cai runs right on a GPU, and how fast.

Here, on a machine with a package index (once):

    python benchmarks/gpu_check.py --prepare

builds `.whl/` (deepspeed, hydra-core, omegaconf and what they need, by ../shared/tools/gpu-wheels.sh)
and `.gpu/cache/` (the embedded model's converted tokenizer, a few MB: the GGUF itself is too large
to carry). Both are git-ignored. Then, on a bare GPU machine, with both carried along:

    python3 benchmarks/gpu_check.py [--skip-tests] [--out DIR]

1. installs the wheels into a temporary folder and runs itself again with it on PYTHONPATH;
2. runs `pytest -m gpu` (tests/test_gpu.py: stage=all on cuda, SFT, PM and PPO under ZeRO-2/3);
3. runs stage=all on one GPU with the tiny builder at SmolLM2-135M's shape (hidden 576, 30 layers,
   9 heads, 3 KV heads, intermediate 1536) and random weights, the quickstart's counts, and prints
   per stage: where each model ran (from the manifests), wall time and peak GPU memory. It fails if
   any model of any stage ran anywhere but cuda.
It took 5 minutes on one H200 (tests 107 s, stage=all 178 s). The README's benchmarks section holds what it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
CACHE = ROOT / ".gpu" / "cache"
TOKENIZER = "smollm2-135m-instruct-tokenizer"
# The tiny builder at SmolLM2-135M's shape, for the policy, the feedback model and the PM backbone.
SHAPE = {"tiny_layers": 30, "tiny_hidden": 576, "tiny_heads": 9, "tiny_kv_heads": 3, "tiny_intermediate": 1536, "dtype": "auto"}
MODEL = ["model=tiny", *(f"{group}.{k}={v}" for group in ("model", "feedback_model", "pm_model") for k, v in SHAPE.items())]


def prepare() -> None:
    """Build what a bare GPU machine lacks: the wheels and the converted tokenizer."""
    sys.path.insert(0, str(ROOT))
    from cai.models import embedded_tokenizer_dir

    source = embedded_tokenizer_dir(os.environ.get("CAI_CACHE", "~/.cache/cai"))
    shutil.rmtree(CACHE / TOKENIZER, ignore_errors=True)
    shutil.copytree(source, CACHE / TOKENIZER)
    script = ROOT.parent / "shared" / "tools" / "gpu-wheels.sh"
    if not WHEELS.exists() or not any(WHEELS.glob("*.whl")):
        # Relative: the script writes the deepspeed wheel to "$OLDPWD/<dest>".
        subprocess.run(["bash", str(script), WHEELS.name], cwd=ROOT, check=True)
    size = sum(p.stat().st_size for p in [*WHEELS.rglob("*"), *CACHE.rglob("*")] if p.is_file())
    print(f"ready: {WHEELS.name}/ and {CACHE.relative_to(ROOT)}/ ({size / 2**20:.1f} MiB); carry both to the GPU machine")


def with_wheels() -> None:
    """Install the carried wheels into a temporary site folder and re-run this script with it (once)."""
    if os.environ.get("CAI_GPU_SITE") or not any(WHEELS.glob("*.whl")):
        return
    site = tempfile.mkdtemp(prefix="cai-site-")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site]
    subprocess.run([*pip, *map(str, WHEELS.glob("*.whl"))], check=True)
    env = {**os.environ, "CAI_GPU_SITE": site, "PYTHONPATH": os.pathsep.join([str(ROOT), site, os.environ.get("PYTHONPATH", "")])}
    sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)


def run_stages(root: Path) -> list[dict]:
    """stage=all, one stage at a time in this process, with each stage's wall time and peak GPU memory."""
    import torch
    from hydra import compose, initialize_config_dir

    import cai.config  # noqa: F401  (registers the schemas)
    from cai.pipeline import STAGES, run, stage_path

    base = [f"paths.root={root}", f"paths.output={root}/out", f"paths.cache={CACHE}", "logger=none", *MODEL]
    rows = []
    for name in STAGES:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose(config_name="train", overrides=[*base, f"stage={name}"])
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        summary = run(cfg)[0]
        seconds = time.perf_counter() - t0
        manifest = json.loads((stage_path(cfg, name) / "manifest.json").read_text())
        rows.append(
            {
                "stage": name,
                "seconds": round(seconds, 1),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "models": manifest.get("models", {}),
                "ran_on": summary.get("ran_on", ""),
                "metric": summary.get("metric", ""),
            }
        )
        print(f"{name:8s} {seconds:7.1f} s  peak {rows[-1]['peak_gpu_gib']:6.2f} GiB  {rows[-1]['ran_on']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true", help="build .whl/ and .gpu/cache/ here, to carry to the GPU machine")
    ap.add_argument("--skip-tests", action="store_true", help="only the stage=all run")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="also write gpu_check.json and the test log here")
    args = ap.parse_args()
    if args.prepare:
        return prepare()
    with_wheels()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible; run it on a GPU machine (benchmarks/gpu_check.py --prepare first)")
    os.environ["CAI_CACHE"] = str(CACHE)
    os.environ.setdefault("WANDB_MODE", "disabled")
    gpu = torch.cuda.get_device_name(0)
    print(f"== {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    result: dict = {"gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if not args.skip_tests:
        print("== pytest -m gpu", flush=True)
        t0 = time.perf_counter()
        tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/"], cwd=ROOT)
        result["tests"] = {"exit_code": tests.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    print("== stage=all, tiny builder at SmolLM2-135M's shape, random weights, quickstart counts", flush=True)
    with tempfile.TemporaryDirectory(prefix="cai-gpu-") as root:
        t0 = time.perf_counter()
        result["stages"] = run_stages(Path(root))
        result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"total {result['total_seconds']:.0f} s")
    off_gpu = [
        (r["stage"], role, m["device"]) for r in result["stages"] for role, m in r["models"].items() if not m["device"].startswith("cuda")
    ]
    for stage, role, device in off_gpu:
        print(f"NOT ON THE GPU: {stage} {role} ran on {device}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=2))
    failed = bool(off_gpu) or result.get("tests", {}).get("exit_code", 0) != 0
    print("gpu_check: FAILED" if failed else "gpu_check: passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
