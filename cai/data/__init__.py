"""Prompt sets shipped with cai, and readers for the formats researchers bring.

Shipped (written for this project; `cai/data/prompts/`): red-team prompts and helpfulness prompts,
each row {id, category, split, prompt}, split 80/20 into train and test within each category.

Read from a user's path:
- prompt files: .jsonl with a `prompt`, `text` or `messages` field (or MT-bench's `turns`), .txt with
  one prompt a line, or .json/.parquet/.csv through `datasets`;
- preference comparisons: hh-rlhf transcripts or TRL's conversational/standard rows, from .jsonl(.gz),
  or .json/.parquet/.csv through `datasets` when it is installed;
- MT-bench `question.jsonl` (first turn of each question, as a helpfulness prompt).

Or from the Hugging Face Hub by name, for any of these fields: `hf:NAME[:SUBSET][:SPLIT]`
(`hf:Anthropic/hh-rlhf:harmless-base:train`), through `datasets.load_dataset` and its cache, so a
dataset loaded once is read offline (`HF_DATASETS_OFFLINE=1`) from then on.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cai.errors import CaiError

HUB = "hf:"  # data fields: hf:NAME[:SUBSET][:SPLIT] is a dataset on the Hugging Face Hub

PROMPTS_DIR = Path(__file__).parent / "prompts"
KINDS = ("red_team", "helpful")
Message = dict[str, str]  # one chat turn: {"role": "user" | "assistant" | "system", "content": str}


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str = ""
    split: str = "train"


@dataclass(frozen=True)
class Comparison:
    """A human comparison: one conversation, the answer people preferred and the one they did not."""

    id: str
    conversation: list[Message]  # ends with the user turn both answers respond to
    chosen: str
    rejected: str


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _lines(path: Path) -> Iterator[str]:
    """The file's lines, with a torn or fake .gz and non-UTF-8 text reported as one line naming the file."""
    try:
        with _open_text(path) as f:
            yield from f
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise CaiError(f"{path}: not a complete gzip file ({err}); download it again, or drop the .gz suffix if it is plain text") from None
    except UnicodeDecodeError as err:
        raise CaiError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); convert it to UTF-8") from None


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CaiError(f"{path}: line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise CaiError(f"{path}: line {n}: each line must be a JSON object")
        yield n, row


def prompt_text(row: dict) -> str | None:
    """A row's prompt: `prompt`, `text`, the first user turn of a `messages` chat list, or MT-bench's first of `turns`."""
    for key in ("prompt", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    if isinstance(row.get("messages"), list):
        users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return users[0] if users else None
    if isinstance(row.get("turns"), list) and row["turns"]:
        return row["turns"][0]  # MT-bench: the first turn stands alone as a prompt
    return None


def hub_spec(spec: str, field: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:SUBSET][:SPLIT]' -> (name, subset or None, split; train by default)."""
    parts = re.split(r":(?![^\[]*\])", spec[len(HUB) :])  # a split may be a slice: train[:1000]
    if not parts[0] or len(parts) > 3 or not all(parts) or "\\" in parts[0]:
        raise CaiError(f"{field}: '{spec}' is not hf:NAME[:SUBSET][:SPLIT]; e.g. hf:Anthropic/hh-rlhf:harmless-base:train")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train"


def hub_dataset(spec: str, field: str):
    """A split of a Hub dataset (`hf:NAME[:SUBSET][:SPLIT]`), through `datasets.load_dataset` and its cache.

    SUBSET is the dataset's config name, or else a folder of its repository (hh-rlhf's harmless-base
    is a folder, not a config). Offline (HF_DATASETS_OFFLINE=1) only what the local cache holds loads.
    """
    name, subset, split = hub_spec(spec, field)
    if spec not in _HUB:
        try:
            import datasets
        except ImportError:
            raise CaiError(f"{field}: '{spec}' needs the `datasets` package (pip install datasets)") from None
        errors: list[str] = []
        for kwargs in ({"name": subset}, {"data_dir": subset}) if subset else ({},):
            try:
                _HUB[spec] = datasets.load_dataset(name, split=split, **kwargs)
                break
            except Exception as err:  # not found, no such config or split, offline and not cached: many kinds
                errors.append(
                    (str(err).splitlines()[0] if str(err) else type(err).__name__) + (f" (as {next(iter(kwargs))})" if kwargs else "")
                )
        else:
            why = "; ".join(errors)
            raise CaiError(
                f"{field}: could not load '{spec}' ({why}); check the name, subset and split on the Hub, or, offline, "
                "load it once where the Hub is reachable (it is read from the datasets cache after that)"
            )
    return _HUB[spec]


_HUB: dict[str, object] = {}  # spec -> the loaded split, once per process


def source_hash(source: str | Path, field: str) -> str:
    """What a data field's content is, for fingerprints: a file's hash, or a Hub dataset's fingerprint
    (datasets derives it from the resolved revision and data files)."""
    from cai.artifacts import file_hash

    return hub_dataset(str(source), field)._fingerprint if str(source).startswith(HUB) else file_hash(source)


def _source_rows(source: str | Path, field: str) -> tuple[str, Iterator[tuple[int, dict]]]:
    """(a name for ids, numbered rows) of a file or a Hub dataset."""
    if str(source).startswith(HUB):
        return hub_spec(str(source), field)[0].rsplit("/", 1)[-1], enumerate(hub_dataset(str(source), field), 1)
    p = Path(source).expanduser()
    return p.name, _table_rows(p, field)


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from .jsonl(.gz) (`prompt`, `text`, `messages` or MT-bench `turns`), .txt (one a line), or
    .json/.parquet/.csv with those fields through `datasets`, or a Hub dataset (`hf:...`). All count as train."""
    hub = str(path).startswith(HUB)
    p = Path(path).expanduser()
    if not hub and not p.is_file():
        raise CaiError(f"{path}: prompt file not found")
    out: list[Prompt] = []
    if not hub and p.suffix == ".txt":
        out = [Prompt(id=f"{p.stem}-{i:05d}", text=line.strip()) for i, line in enumerate(_lines(p)) if line.strip()]
    else:
        stem, rows = _source_rows(path, "prompt file")
        stem = stem if hub else p.stem
        for n, row in rows:
            text = prompt_text(row)
            if not isinstance(text, str) or not text.strip():
                raise CaiError(
                    f"{p}: line {n}: no prompt text; each row needs one of 'prompt', 'text', 'messages' "
                    "(a chat list with a user turn) or MT-bench 'turns'"
                )
            pid = str(row.get("id", row.get("question_id", f"{stem}-{n:05d}")))
            out.append(Prompt(id=pid, text=text.strip(), category=str(row.get("category", "")), split=row.get("split", "train")))
    if not out:
        raise CaiError(f"{p}: the prompt file is empty; add at least one prompt")
    return out


def sample_prompts(rows: list[Prompt], n: int, seed: str) -> list[Prompt]:
    """A seeded sample of n rows (0 = all), stratified by category, in file order.

    Files are often sorted by category, so their head is a few categories only. Here each category's
    rows are shuffled and categories take turns, in a shuffled order, giving one row each until n are
    drawn: n rows cover min(n, categories) categories, and a seed change draws others.
    """
    if not n or n >= len(rows):
        return rows
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_category.setdefault(r.category, []).append(i)
    queues = [rng.sample(idx, len(idx)) for idx in by_category.values()]
    rng.shuffle(queues)
    picked: list[int] = []
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return [rows[i] for i in sorted(picked)]


def load_prompts(kind: str, source: str = "builtin", split: str = "train", n: int = 0, seed: int = 0) -> list[Prompt]:
    """The prompts a stage uses: the shipped set (one split) or a user's file, n of them (0 = all) drawn
    by sample_prompts with the run's seed (the same for every stage that reads this split)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    field = f"data.{kind}"
    if source == "yours":  # experiment=paper: the built-in sets are far too small for the paper's scale
        raise CaiError(
            f"{field}: experiment=paper needs your own {kind.replace('_', '-')} prompts: set {field}=FILE (.jsonl with a "
            f"'prompt' field, or .txt); the built-in set holds a few hundred. README 'Paper scale' lists public sets that fit, "
            f"or set {field}=builtin to run with the built-in set anyway"
        )
    if source == "builtin":
        rows = read_prompt_file(PROMPTS_DIR / f"{kind}.jsonl")
        rows = [r for r in rows if r.split == split]
    else:
        try:
            rows = read_prompt_file(source)
        except CaiError as err:
            raise CaiError(f"{field}: {err}") from None
        # A user's file has no split: hold out every fifth prompt for test, like the shipped sets.
        if not all(r.split in ("train", "test") for r in rows) or {r.split for r in rows} == {"train"}:
            rows = [r for i, r in enumerate(rows) if (i % 5 == 4) == (split == "test")]
        else:
            rows = [r for r in rows if r.split == split]
    if n < 0:
        raise CaiError(f"data.n_{kind}: must be >= 0 (0 = all), got {n}")
    if not rows:
        raise CaiError(f"{field}: no {split} prompts in '{source}'")
    return sample_prompts(rows, n, f"{seed}:{kind}:{split}")


_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(text: str) -> list[Message]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{'role': 'user', ...}, {'role': 'assistant', ...}]."""
    parts = _TURN.split(text)
    return [{"role": "user" if parts[k] == "Human" else "assistant", "content": parts[k + 1].strip()} for k in range(1, len(parts) - 1, 2)]


KIND_NAMES = {"red_team": "red_team", "harmless": "red_team", "helpful": "helpful"}


def _prompt_of(row: dict) -> list[Message] | None:
    """A prompt as a conversation: plain text, a messages list, or an hh-style transcript."""
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        conv = [m for m in prompt if m["role"] != "assistant" or m is not prompt[-1]]  # a trailing answer is not prompt
    elif isinstance(prompt, str) and "\n\nHuman:" in prompt:
        conv = parse_transcript(prompt.rstrip() + ("" if prompt.rstrip().endswith("Assistant:") else "\n\nAssistant:"))
        conv = conv[:-1] if conv and conv[-1]["role"] == "assistant" and not conv[-1]["content"] else conv
    elif isinstance(prompt, str) and prompt.strip():
        conv = [{"role": "user", "content": prompt.strip()}]
    else:
        return None
    return conv if conv and conv[-1]["role"] == "user" else None


def read_answer_set(path: str | Path, field: str = "eval.external") -> list[dict]:
    """Another system's answers: JSONL rows with a prompt and one or more answers.

    The prompt is `prompt` (plain text or an hh-style "\n\nHuman: ...\n\nAssistant:" transcript) or
    `messages` (a chat list ending with the user's turn); the answer is `response`, or the first of
    `responses` / `answers`. An optional `kind` (red_team, harmless or helpful) names the axis, for
    prompts that no run shares. Returns {conversation, prompt (the last user turn), kind, response}.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CaiError(f"{field}: '{path}' not found; give a JSONL file of prompts and answers")
    out = []
    for n, row in _jsonl(p):
        conv = _prompt_of(row)
        if conv is None:
            raise CaiError(f"{p}: line {n}: no prompt; give 'prompt' (text or an hh transcript) or 'messages' ending with a user turn")
        answers = row.get("response", row.get("responses", row.get("answers")))
        answer = answers[0] if isinstance(answers, list) and answers else answers
        if not isinstance(answer, str):
            raise CaiError(f"{p}: line {n}: no answer; give 'response' (text) or 'responses' (a list of texts)")
        kind = row.get("kind")
        if kind is not None and kind not in KIND_NAMES:
            raise CaiError(f"{p}: line {n}: kind '{kind}' is not one of {', '.join(KIND_NAMES)}")
        out.append({"conversation": conv, "prompt": conv[-1]["content"], "kind": KIND_NAMES.get(kind), "response": answer.strip()})
    if not out:
        raise CaiError(f"{p}: the answer set is empty")
    return out


def human_pairs(comparisons: list[Comparison], seed: int) -> list[dict]:
    """Human comparisons as labelled pairs {id, conversation, response_a, response_b, label}.

    The chosen answer is put second at random (seeded), with label 0, so that 'a' is not always
    the preferred one; label 1 means a was chosen.
    """
    rng = random.Random(seed)
    rows = []
    for c in comparisons:
        flip = rng.random() < 0.5
        a, b = (c.rejected, c.chosen) if flip else (c.chosen, c.rejected)
        rows.append({"id": c.id, "conversation": c.conversation, "response_a": a, "response_b": b, "label": 0.0 if flip else 1.0})
    return rows


PREFERENCE_FORMATS = (
    "hh-rlhf ('chosen' and 'rejected' transcripts), TRL conversational ('chosen' and 'rejected' message lists, "
    "with or without a 'prompt' message list) or TRL standard ('prompt', 'chosen' and 'rejected' texts)"
)


def _messages(value: object) -> list[Message] | None:
    """A chat list of {role, content} dicts, or None if value is not one."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def comparison_turns(row: dict) -> tuple[list[Message], list[Message]] | None:
    """The two whole conversations of a preference row, in any of PREFERENCE_FORMATS; None if it is none of them."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, str):  # TRL standard, explicit prompt
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}], [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": rejected},
            ]
        return parse_transcript(chosen), parse_transcript(rejected)  # hh-rlhf transcripts
    chosen_msgs, rejected_msgs = _messages(chosen), _messages(rejected)
    if chosen_msgs is None or rejected_msgs is None:
        return None
    if prompt is None:  # TRL conversational, implicit prompt: each list is the whole conversation
        return chosen_msgs, rejected_msgs
    prompt_msgs = _messages(prompt) or ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else None)
    return (prompt_msgs + chosen_msgs, prompt_msgs + rejected_msgs) if prompt_msgs else None


LIST_FIELDS = ("chosen", "rejected", "prompt", "messages", "turns")  # a CSV cell may hold one of these as JSON


def _table_rows(p: Path, field: str) -> Iterator[tuple[int, dict]]:
    """Rows of a .jsonl(.gz) file (our reader, with line numbers), or of .json/.parquet/.csv through `datasets`."""
    if p.suffix in (".jsonl", ".gz") or p.name.endswith(".jsonl.gz"):
        yield from _jsonl(p)
        return
    kinds = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if p.suffix not in kinds:
        raise CaiError(f"{field}: '{p}' is not .jsonl, .jsonl.gz, .json, .parquet or .csv")
    try:
        import datasets
    except ImportError:
        raise CaiError(f"{field}: reading {p.suffix} files needs the `datasets` package (pip install datasets), or give .jsonl") from None
    try:
        table = datasets.load_dataset(kinds[p.suffix], data_files=str(p), split="train")
    except Exception as err:  # datasets raises many kinds; the first line names the problem
        raise CaiError(f"{p}: datasets could not read it: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for n, row in enumerate(table, 1):
        yield n, {k: json.loads(v) if isinstance(v, str) and v[:1] == "[" and k in LIST_FIELDS else v for k, v in row.items()}


def read_hh_rlhf(path: str | Path, field: str = "data") -> list[Comparison]:
    """Preference rows -> comparisons of two final assistant answers to one conversation.

    Any of PREFERENCE_FORMATS, from .jsonl(.gz), or .json/.parquet/.csv when `datasets` is installed
    (message lists in a CSV cell are read as JSON). Rows whose two conversations differ before the
    last assistant turn, or that do not end with an assistant turn, are not comparisons of one answer
    and are skipped.
    """
    p = Path(path).expanduser()
    if not str(path).startswith(HUB) and not p.is_file():
        raise CaiError(f"{field}: '{path}' not found; give a file of preference rows (or hf:NAME[:SUBSET][:SPLIT]): {PREFERENCE_FORMATS}")
    out = []
    name, rows = _source_rows(path, field)
    for n, row in rows:
        turns = comparison_turns(row)
        if turns is None:
            raise CaiError(
                f"{p}: line {n}: not a preference row (fields: {', '.join(sorted(row)) or 'none'}); accepted: {PREFERENCE_FORMATS}"
            )
        chosen, rejected = turns
        if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            continue
        if chosen[:-1] != rejected[:-1] or not chosen[:-1] or chosen[-2]["role"] != "user":
            continue
        out.append(Comparison(id=f"{name}:{n}", conversation=chosen[:-1], chosen=chosen[-1]["content"], rejected=rejected[-1]["content"]))
    if not out:
        raise CaiError(f"{p}: no usable comparisons; the file is empty or no row has a shared conversation ending in two answers")
    return out
