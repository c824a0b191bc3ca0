"""Stage artifacts: one directory per stage and lineage, a manifest, skip when up to date, resume when not.

A stage's directory is `${paths.artifacts}/<stage>/<lineage key>/` (the pipeline computes the
key: a hash of the config fields that the stage and every stage upstream of it read).
`<stage>/latest` links to the directory last completed.

The directory holds the data (JSONL shards or a checkpoint) and `manifest.json`: the stage config,
hashes of its inputs, counts, versions and times, the version of cai's code that computed it, and a
digest of every file it wrote. The *fingerprint* is a hash of the same config fields as the lineage
key, of the inputs (the contents of prompt files, the constitution, the weights of the models named
by path, the upstream fingerprints and output digests) and of the code version. On a re-run:
- a complete manifest with the same fingerprint, and every file it recorded still there with the
  same digest: the stage is skipped (a damaged one is moved aside to `<key>.damaged-<time>` and
  redone; a later stage that reads it refuses it with one line naming the file);
- the same but for the code version: redone, unless `allow_other_code=true`, which reuses it with
  a warning naming the code version it came from;
- the same fingerprint but not complete (interrupted): the stage resumes from what is there;
- another fingerprint: the old directory is moved aside to `<key>.stale-<fingerprint>` (nothing
  already written is lost) and the stage starts afresh.

A later stage reads a finished one through an `Upstream` handle: its rows, or its model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import cai
from cai.distributed import all_gather, is_rank_zero, mine
from cai.errors import CaiError
from cai.usage import counts as usage_counts

log = logging.getLogger(__name__)


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_HASHES: dict[tuple, str] = {}  # (path, inode, size, mtime) -> content hash: a file is read once per process


def file_hash(path: str | Path) -> str:
    """A file's content hash. Memoised by the file's identity on disk, so checking a stage's outputs
    where this process has just written or checked them costs nothing; another process reads the bytes."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()[:16]
    return _HASHES[key]


@functools.cache
def code_version() -> str:
    """cai's version and a digest of its source (every .py file of the package).

    It changes with any change to the code, so a stage computed by other code (before a numerics
    fix, say) is never taken for this code's output. A checkout and a wheel of the same source agree.
    """
    h = hashlib.sha256()
    for path in sorted(cai.PACKAGE.rglob("*.py")):
        h.update(path.relative_to(cai.PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{cai.__version__}+{h.hexdigest()[:12]}"


# What a stage directory holds besides its output: its bookkeeping, and Lightning's resume checkpoints.
NOT_OUTPUT = ("manifest.json", "checkpoints")
# What later stages read (rows, models, PPO's snapshots): their digest is what a later stage is keyed by,
# so a report or a timing in metrics.json that differs between two identical runs redoes nothing downstream.
READ_BY_LATER_STAGES = ("shard-", "model/", "snapshots/")


def output_digests(path: Path) -> dict[str, str]:
    """{relative path: content hash} of every file a stage wrote under path (its data and models)."""
    path = Path(path)
    out = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and rel.parts[0] not in NOT_OUTPUT and not any(p.startswith(".") or ".tmp" in p for p in rel.parts):
            out[rel.as_posix()] = file_hash(f)
    return out


def damage(path: Path, manifest: dict) -> str | None:
    """What is wrong with a finished stage's files, or None: each file recorded at completion must be
    there with the same content, and no shard may have been added (a later stage reads every shard).

    A manifest from before outputs were recorded has nothing to check against (None).
    """
    recorded = manifest.get("outputs")
    if not isinstance(recorded, dict):
        return None
    path = Path(path)
    for rel, digest in recorded.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        if file_hash(f) != digest:
            return f"{f} has changed since the stage completed (damaged or edited)"
    for f in sorted(path.glob("shard-*.jsonl")):
        if f.name not in recorded:
            return f"{f} was not written by the stage"
    return None


def stage_fingerprint(config: dict, inputs: dict, code: str | None) -> str:
    """The hash a manifest is matched by. A manifest written before code versions were recorded has none."""
    return fingerprint({"config": config, "inputs": inputs, **({"code": code} if code else {})})


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "cai": cai.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def read_manifest(path: Path) -> dict | None:
    """A manifest's contents, or None if there is none or it is not a readable JSON object (torn, garbled, `[]`)."""
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
        return None
    return m if isinstance(m, dict) else None


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Any]:
    """A text file written whole or not at all (temp file, fsync, rename), so neither a crash nor a
    power cut leaves a torn one. A failed write (a full disk) removes the temp file and names the file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, so a manifest is never torn."""
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSONL file; a torn or garbled file is one clear line naming the file and line."""
    rows, n = [], 0
    try:
        with Path(path).open(encoding="utf-8") as f:
            for line in f:
                n += 1
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict):
                        raise ValueError("not a JSON object")
    except (json.JSONDecodeError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        where = f"line {n}" if not isinstance(err, UnicodeDecodeError) else "not UTF-8 text"
        raise CaiError(f"{path}: {where}: cannot be read ({str(err).splitlines()[0]}); the file is damaged") from None
    return rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write a whole shard atomically: it either exists complete or not at all."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def shard_rows(path: Path) -> list[dict]:
    """Every row of every `shard-*.jsonl` in a stage directory, in shard order."""
    return [row for shard in sorted(Path(path).glob("shard-*.jsonl")) for row in read_jsonl(shard)]


class StageDir:
    """The output directory of one stage, for one lineage key and fingerprint."""

    def __init__(self, stage: str, path: Path, config: dict, inputs: dict, allow_other_code: bool = False) -> None:
        self.stage = stage
        self.path = Path(path)
        self.config = config
        self.inputs = inputs
        self.code = code_version()
        self.allow_other_code = allow_other_code
        self.fingerprint = stage_fingerprint(config, inputs, self.code)
        self.manifest_path = self.path / "manifest.json"
        self.earlier: dict[str, float] = {}  # usage of the shards written by earlier runs (set by open)
        self.damaged = False  # set by is_complete when a finished directory's files do not match its manifest
        self._started = time.time()

    def manifest(self) -> dict | None:
        m = read_manifest(self.manifest_path)
        if m is None and self.manifest_path.exists():
            log.warning(
                "%s: %s cannot be read (torn, or not a JSON object); the directory will be moved aside and redone",
                self.stage,
                self.manifest_path,
            )
        return m

    def is_complete(self) -> bool:
        """Complete, for this fingerprint, and every file it wrote still as it was written.

        A damaged one (a shard deleted, a line dropped, a weight file changed) is not: it is moved
        aside by `open` and redone, with a warning naming the file.
        """
        m = self.manifest()
        if not m or m.get("status") != "complete":
            return False
        if m.get("fingerprint") != self.fingerprint and not self._other_code(m):
            return False
        if problem := damage(self.path, m):
            log.warning("%s: %s; the directory will be moved aside (not deleted) and the stage redone", self.stage, problem)
            self.damaged = True
            self.fingerprint = stage_fingerprint(self.config, self.inputs, self.code)  # redone by this code
            return False
        return True

    def _other_code(self, m: dict) -> bool:
        other = m.get("code")
        if self.allow_other_code and m.get("fingerprint") == stage_fingerprint(self.config, self.inputs, other):
            # Same config and inputs, other code: reused only because the user asked for it.
            log.warning(
                "%s: reusing %s, computed by cai %s, not by this code (%s), because allow_other_code=true",
                self.stage,
                self.path,
                other or "of an unrecorded version",
                self.code,
            )
            self.fingerprint = m["fingerprint"]  # downstream stages see what they read
            return True
        return False

    def open(self) -> StageDir:
        """Get the directory ready: move a stale or damaged one aside, or keep a partial one to resume."""
        m = self.manifest()
        stale = m is None or m.get("fingerprint") != self.fingerprint
        if self.path.exists() and any(self.path.iterdir()) and (stale or self.damaged):
            old = "damaged" if self.damaged else f"stale-{(m or {}).get('fingerprint', 'unknown')}"
            aside = self.path.with_name(f"{self.path.name}.{old}-{int(time.time())}")
            why = "its files were damaged" if self.damaged else "config or inputs changed"
            log.warning("%s: %s; moving the old artifacts to %s", self.stage, why, aside)
            os.replace(self.path, aside)
            self.damaged = False
        self.path.mkdir(parents=True, exist_ok=True)
        # What the shards already written by earlier, interrupted runs cost (tokens, seconds), so
        # that a resumed stage's usage is the whole job's, not only this run's share.
        self.earlier = {}
        for f in self.path.glob(".usage-shard-*.json"):
            if (self.path / f.name.removeprefix(".usage-").removesuffix(".json")).with_suffix(".jsonl").exists():
                for k, v in (read_manifest(f) or {}).items():
                    self.earlier[k] = self.earlier.get(k, 0) + v
        # Half-written files of a run that died (the stage lock is held), a checkpoint's included.
        for leftover in [f for f in self.path.rglob("*.tmp*") if f.is_file()]:
            leftover.unlink()
        self._write("running", {})
        return self

    def complete(self, counts: dict, extra: dict | None = None) -> dict:
        """Mark the stage done: later runs with the same fingerprint skip it; point `latest` here.

        The manifest records a digest of every file written, so a later stage (and the evaluation's
        answer cache) is keyed by what was computed, not only by what was asked for: a PPO retrained
        with the same config but other weights (another device count, GPU nondeterminism) is new.
        """
        outputs = output_digests(self.path)
        read_later = {k: v for k, v in outputs.items() if k.startswith(READ_BY_LATER_STAGES)}
        data = self._write("complete", counts, {**(extra or {}), "outputs": outputs, "output_digest": fingerprint(read_later)})
        link = self.path.parent / "latest"
        tmp = self.path.parent / f".latest.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(self.path.name, tmp)
        os.replace(tmp, link)
        return data

    def _write(self, status: str, counts: dict, extra: dict | None = None) -> dict:
        previous = self.manifest() or {}
        data = {
            "stage": self.stage,
            "status": status,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "code": self.code,
            "counts": counts,
            "versions": versions(),
            "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds_this_run": round(time.time() - self._started, 1),
            **(extra or {}),
        }
        write_json(self.manifest_path, data)
        return data

    def rows(self) -> list[dict]:
        """Every row of every shard, in shard order."""
        return shard_rows(self.path)

    def write_shards(self, chunks: list[list[Any]], make: Callable[[list[Any], int], list[dict]], desc: str) -> int:
        """Write one JSONL shard per chunk with make(chunk, index), skipping shards already written.

        A shard is written whole or not at all, so an interrupted stage resumes at the first missing
        shard with nothing lost or duplicated. Returns how many shards were already there.
        With several ranks, rank r writes shards r, r + N, ...; a shard's content depends on its index
        alone, so the rows are a 1-process run's. Every rank returns once all shards are written.
        """
        resumed = 0
        for i in tqdm(mine(len(chunks)), desc=desc, unit="shard", disable=not is_rank_zero()):
            path = self.path / f"shard-{i:05d}.jsonl"
            if path.exists():
                resumed += 1
                continue
            before, t0 = usage_counts(), time.perf_counter()
            write_jsonl(path, make(chunks[i], i))
            # What making this shard cost, kept beside it, so a resumed stage reports the whole job's usage.
            spent = {k: v - before[k] for k, v in usage_counts().items()} | {"seconds": round(time.perf_counter() - t0, 3)}
            write_json(self.path / f".usage-{path.stem}.json", spent)
        resumed = sum(all_gather(resumed))  # also the barrier: every shard is on disk past this line
        if resumed:
            log.info("%s: resumed; %d of %d shards were already written", self.stage, resumed, len(chunks))
        return resumed


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass(frozen=True)
class Upstream:
    """A finished stage's output, as a later stage reads it: its rows, its model, its fingerprint."""

    stage: str
    path: Path
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def output_digest(self) -> str | None:
        """A digest of every file the stage wrote (None for a manifest from before digests were recorded)."""
        return self.manifest.get("output_digest")

    def digest_under(self, sub: Path) -> str:
        """A digest of the files the stage wrote under one of its subfolders (a model, a snapshot)."""
        prefix = Path(sub).relative_to(self.path).as_posix() + "/"
        if "outputs" in self.manifest:
            files = {k: v for k, v in self.manifest["outputs"].items() if k.startswith(prefix)}
        else:  # a manifest from before digests were recorded (reused with allow_other_code): read the files
            files = {prefix + k: v for k, v in output_digests(Path(sub)).items()}
        if not files:
            raise CaiError(f"{self.path / 'manifest.json'}: records no files under {prefix}; re-run stage {self.stage}")
        return fingerprint(files)

    @property
    def model_dir(self) -> Path:
        """The HF checkpoint a training stage wrote (sft, pm, ppo)."""
        return self.path / "model"

    def rows(self) -> list[dict]:
        """Every row of every shard, in shard order."""
        return shard_rows(self.path)

    def model_spec(self, name: str, dtype: str, cache: str):
        """The stage's trained model as a ModelSpec (pairs, PPO and eval load the SFT model this way)."""
        from cai.models import ModelSpec

        return ModelSpec(name=name, source="local", path=str(self.model_dir), dtype=dtype, cache=cache)
