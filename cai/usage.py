"""What a stage used: wall time, tokens generated and forwarded, and peak memory (RSS).

The pipeline measures every stage it builds and writes the numbers into the stage's manifest
(`usage`), so `benchmarks/bench_main.py` can show where the main job's time and memory go.

- forward tokens: token positions that went through a model's input embedding (prompt, padding and
  every decoding step alike: the work a forward pass does), counted by a global forward hook on
  vocabulary-sized `nn.Embedding` modules while a stage runs;
- generated tokens: new tokens returned by a generation backend (`Generator.generate` adds them);
- peak RSS: the kernel's high-water mark of this process's resident memory (VmHWM), reset when the
  stage starts, so each stage reports its own peak (where /proc is missing, the process's peak so far).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

MIN_VOCAB = 4096  # an embedding with this many rows or more is a token embedding, not a position table
_counts = {"generated_tokens": 0, "forward_tokens": 0}


def counts() -> dict[str, int]:
    """The tokens generated and forwarded so far in this process."""
    return dict(_counts)


def add_generated(n: int) -> None:
    """Called by the generation backends with the number of new tokens they returned."""
    _counts["generated_tokens"] += n


def _count_forward(module: torch.nn.Module, args: tuple) -> None:
    if isinstance(module, torch.nn.Embedding) and module.num_embeddings >= MIN_VOCAB and args and torch.is_tensor(args[0]):
        _counts["forward_tokens"] += args[0].numel()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux: write 5 to clear_refs); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak resident memory of this process since the last reset (or since it started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed memory in its heap, and after a few large frees it serves tensors of up to
    32 MB from there too, so a training loop's RSS grows step by step with fragments of freed
    activations (measured on the PM: 3.3 to 5.6 GB over three steps). A trim after each step costs
    about 3% of the step and keeps the peak where the live tensors put it.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def trim_after_each_layer(model) -> None:
    """Trim the heap after each decoder layer's forward (and its recompute in backward) on a CPU.

    A layer's temporaries below the mmap threshold (LoRA's low-rank products, norms, rotary tables)
    are freed into glibc's heap, where the next layer's land beside live tensors and the heap grows:
    measured on the main job's PPO with peft=lora, the actor's forward raised RSS by 1.2 GiB; trimmed
    per layer, by 0.2 GiB, at about 7 ms a trim (0.7 s of a 27 s PPO iteration). Decoding steps
    (one token) are not trimmed: they leave little behind, and there are thousands of them.
    """
    layers = set(getattr(model, "_no_split_modules", None) or ())  # transformers names its decoder layers here

    def trim(module, args, kwargs, out) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")  # (B, T, H); a decoding step (T = 1) leaves little behind
        if isinstance(hidden, torch.Tensor) and hidden.device.type == "cpu" and hidden.dim() == 3 and hidden.shape[1] > 1:
            trim_heap()

    for module in model.modules():
        if type(module).__name__ in layers:
            module.register_forward_hook(trim, with_kwargs=True)


# Tensors above this size get their own memory map, returned to the system the moment they are freed.
# glibc's default threshold rises with every large free, up to 32 MB, after which a forward pass's
# temporaries (a LoRA layer's dropout copy, its low-rank products) stay in the heap as fragments:
# measured on the main job's PM with peft=lora, peak RSS 2.68 GB by default, 2.27 GB at 4 MiB
# (1.88 GB at 1 MiB, but 43% slower: every smaller tensor would fault in fresh pages).
MMAP_THRESHOLD = 4 * 2**20


def bound_heap() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD for this process (elsewhere nothing), so large freed tensors leave RSS."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; setting it also turns off glibc's dynamic raising


@functools.cache
def _glibc():
    """This process's glibc (loaded once: the trim runs after every training batch), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory() -> None:
    """Free what a finished stage left behind: unreachable objects, then free heap pages."""
    gc.collect()
    trim_heap()


@contextlib.contextmanager
def measure() -> Iterator[dict]:
    """Measure the work in the block; the yielded dict is filled in when the block ends."""
    result: dict = {}
    start = dict(_counts)
    release_memory()
    per_stage = _reset_peak_rss()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(_count_forward)
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        handle.remove()
        release_memory()
        seconds = time.perf_counter() - t0
        done = {k: _counts[k] - start[k] for k in _counts}
        result.update(
            seconds=round(seconds, 1),
            **done,
            forward_tokens_per_s=round(done["forward_tokens"] / max(seconds, 1e-9), 1),
            generated_tokens_per_s=round(done["generated_tokens"] / max(seconds, 1e-9), 1),
            peak_rss_gb=round(peak_rss_bytes() / 2**30, 2),
            peak_rss_scope="stage" if per_stage else "process",
        )


def including_earlier(result: dict, earlier: dict[str, float]) -> dict:
    """A resumed stage's usage: this run's plus what the shards written by its earlier runs cost.

    Rates are recomputed over the sum; `earlier_runs` keeps the earlier share, so nothing is double-counted.
    """
    if not earlier:
        return result
    out = dict(result)
    for k in ("seconds", "generated_tokens", "forward_tokens"):
        out[k] = round(result.get(k, 0) + earlier.get(k, 0), 1 if k == "seconds" else None)
    seconds = max(out["seconds"], 1e-9)
    out["forward_tokens_per_s"] = round(out["forward_tokens"] / seconds, 1)
    out["generated_tokens_per_s"] = round(out["generated_tokens"] / seconds, 1)
    out["earlier_runs"] = {k: round(v, 1) for k, v in earlier.items()}
    return out
