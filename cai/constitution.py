"""Constitutions: load and validate principle files, and draw principles for SL rounds and RL labels.

Two formats are read:
- our YAML schema (constitutions/*.yaml), documented in constitutions/README.md;
- the paper authors' JSON files, from a folder the user gives (their own copy of the authors'
  repository): CritiqueRevisionInstructions.json + CritiqueRevisionFewShotPrompts.json for SL,
  RLMadisonInstructions.json + RLMadisonFewShotPrompts.json for RL.

Every error names the file, the principle and the field, so a bad constitution is fixed in one go.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cai.data import Message, parse_transcript
from cai.errors import CaiError


@dataclass(frozen=True)
class SLPrinciple:
    """A critique request and the matching revision request (SL-CAI)."""

    id: str
    critique: str
    revision: str


@dataclass(frozen=True)
class RLPrinciple:
    """A comparison question asked of the feedback model (RL-CAI)."""

    id: str
    question: str


@dataclass(frozen=True)
class SLExample:
    """A worked critique/revision, shown before the model's own turn."""

    conversation: list[Message]  # ends with the user turn the response answers
    response: str
    critique: str
    revision: str
    principle: str | None = None  # id of the principle whose requests the example uses
    critique_request: str | None = None  # the request text, when it is not a principle's
    revision_request: str | None = None


@dataclass(frozen=True)
class RLExample:
    """A worked comparison: the better and the worse answer, and optionally the reasoning."""

    conversation: list[Message]
    chosen: str
    rejected: str
    reasoning: str | None = None


@dataclass
class Constitution:
    """A validated constitution plus how RL principles are drawn for each comparison."""

    name: str
    source: str
    sl_principles: list[SLPrinciple] = field(default_factory=list)
    rl_principles: list[RLPrinciple] = field(default_factory=list)
    sl_examples: list[SLExample] = field(default_factory=list)
    rl_examples: list[RLExample] = field(default_factory=list)
    ensemble_size: int = 1  # 0 = all RL principles
    principle: str | None = None  # a single RL principle id
    variant: str = "custom"  # the config option that chose the sampling (default/ensemble/single)

    def sl_principle(self, pid: str) -> SLPrinciple:
        for p in self.sl_principles:
            if p.id == pid:
                return p
        raise CaiError(f"{self.source}: no SL principle with id '{pid}'")

    def rl_principle(self, pid: str) -> RLPrinciple:
        for p in self.rl_principles:
            if p.id == pid:
                return p
        ids = ", ".join(p.id for p in self.rl_principles)
        raise CaiError(f"{self.source}: no RL principle with id '{pid}'; the ids are: {ids}")

    def draw_sl(self, rng: random.Random) -> SLPrinciple:
        """One SL principle, uniformly at random (the paper draws one per revision round)."""
        if not self.sl_principles:
            raise CaiError(f"{self.source}: has no SL principles, so it cannot drive SL-CAI")
        return rng.choice(self.sl_principles)

    def draw_rl(self, rng: random.Random) -> list[RLPrinciple]:
        """The RL principles one comparison is labelled under (averaged by the labeller)."""
        if not self.rl_principles:
            raise CaiError(f"{self.source}: has no RL principles, so it cannot label comparisons")
        if self.principle is not None:
            return [self.rl_principle(self.principle)]
        if self.ensemble_size <= 0 or self.ensemble_size >= len(self.rl_principles):
            return list(self.rl_principles)
        return rng.sample(self.rl_principles, self.ensemble_size)

    def digest(self) -> str:
        """A hash of the principles and examples (not how they are drawn), for artifact manifests."""
        blob = json.dumps(
            {k: v for k, v in asdict(self).items() if k not in ("source", "variant", "ensemble_size", "principle")},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_constitution(path: str, ensemble_size: int = 1, principle: str | None = None, variant: str = "custom") -> Constitution:
    """Load a constitution YAML file or a folder of the paper authors' JSON files, and validate it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CaiError(f"constitution.path: '{path}' does not exist; give a .yaml file or a folder of the paper's JSON files")
    if ensemble_size < 0:
        raise CaiError(f"constitution.ensemble_size: must be >= 0 (0 = all principles), got {ensemble_size}")
    c = _load_paper_dir(p) if p.is_dir() else _load_yaml(p)
    c.ensemble_size = ensemble_size
    c.principle = principle
    c.variant = variant
    if principle is not None:
        c.rl_principle(principle)  # fail now, not mid-run, if the id is wrong
    return c


# --- our YAML schema ---------------------------------------------------------------------------

_TOP = {"name", "description", "sl", "rl"}
_SECTION = {"principles", "few_shot"}
_SL_P = {"id": True, "critique": True, "revision": True}
_RL_P = {"id": True, "question": True}
_SL_X = {"conversation": True, "response": True, "critique": True, "revision": True, "principle": False}
_RL_X = {"conversation": True, "chosen": True, "rejected": True, "reasoning": False}


def _load_yaml(path: Path) -> Constitution:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:  # one line: where, and what the parser expected
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise CaiError(f"{path}: not valid YAML ({where}{getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError:
        raise CaiError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    if not isinstance(data, dict):
        raise CaiError(f"{path}: a constitution must be a mapping with 'name', 'sl' and/or 'rl'")
    _no_unknown(path, "top level", data, _TOP)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CaiError(f"{path}: missing field 'name' (a short name for the constitution)")
    if "sl" not in data and "rl" not in data:
        raise CaiError(f"{path}: needs an 'sl' section, an 'rl' section or both")
    c = Constitution(name=name, source=str(path))
    for section in ("sl", "rl"):
        body = data.get(section)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise CaiError(f"{path}: '{section}' must be a mapping with 'principles' and 'few_shot'")
        _no_unknown(path, section, body, _SECTION)
        principles = body.get("principles")
        if not isinstance(principles, list) or not principles:
            raise CaiError(f"{path}: '{section}.principles' must be a non-empty list")
        spec, ex_spec = (_SL_P, _SL_X) if section == "sl" else (_RL_P, _RL_X)
        seen: set[str] = set()
        for i, raw in enumerate(principles):
            where = f"{section}.principles[{i}]"
            fields = _fields(path, where, raw, spec)
            where = f"{where} (id '{fields['id']}')"
            if fields["id"] in seen:
                raise CaiError(f"{path}: {where}: duplicate id; every principle id must be unique")
            seen.add(fields["id"])
            if section == "sl":
                c.sl_principles.append(SLPrinciple(**fields))
            else:
                c.rl_principles.append(RLPrinciple(**fields))
        for i, raw in enumerate(body.get("few_shot") or []):
            where = f"{section}.few_shot[{i}]"
            fields = _fields(path, where, raw, ex_spec)
            fields["conversation"] = _conversation(path, where, fields["conversation"])
            if section == "sl":
                if fields.get("principle") and fields["principle"] not in seen:
                    raise CaiError(f"{path}: {where}: field 'principle' names '{fields['principle']}', which is not an SL principle id")
                c.sl_examples.append(SLExample(**fields))
            else:
                c.rl_examples.append(RLExample(**fields))
    return c


def _no_unknown(path: Path, where: str, data: dict, allowed: set[str]) -> None:
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise CaiError(f"{path}: {where}: unknown field '{extra[0]}'; allowed fields: {', '.join(sorted(allowed))}")


def _fields(path: Path, where: str, raw: Any, spec: dict[str, bool]) -> dict[str, Any]:
    """Check one principle or example: required fields present, text non-empty, nothing unknown."""
    if not isinstance(raw, dict):
        raise CaiError(f"{path}: {where}: must be a mapping with fields {', '.join(spec)}")
    label = f"{where} (id '{raw['id']}')" if isinstance(raw.get("id"), str) else where
    _no_unknown(path, label, raw, set(spec))
    out = {}
    for key, required in spec.items():
        value = raw.get(key)
        if value is None:
            if required:
                raise CaiError(f"{path}: {label}: missing field '{key}'")
            continue
        if key != "conversation" and (not isinstance(value, str) or not value.strip()):
            raise CaiError(f"{path}: {label}: field '{key}' must be non-empty text")
        out[key] = value.strip() if isinstance(value, str) else value
    return out


def _conversation(path: Path, where: str, turns: Any) -> list[Message]:
    if isinstance(turns, str):  # shorthand: one user turn
        return [{"role": "user", "content": turns.strip()}]
    if not isinstance(turns, list) or not turns:
        raise CaiError(f"{path}: {where}: field 'conversation' must be text or a list of {{role, content}} turns")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("role") not in ("user", "assistant", "system") or not isinstance(t.get("content"), str):
            raise CaiError(f"{path}: {where}: conversation[{j}] must have role user/assistant/system and text content")
        out.append({"role": t["role"], "content": t["content"].strip()})
    if out[-1]["role"] != "user":
        raise CaiError(f"{path}: {where}: field 'conversation' must end with a user turn")
    return out


# --- the paper authors' JSON format -------------------------------------------------------------

SL_FILES = ("CritiqueRevisionInstructions.json", "CritiqueRevisionFewShotPrompts.json")
RL_FILES = ("RLMadisonInstructions.json", "RLMadisonFewShotPrompts.json")


def _load_paper_dir(folder: Path) -> Constitution:
    has_sl = (folder / SL_FILES[0]).exists()
    has_rl = (folder / RL_FILES[0]).exists()
    if not (has_sl or has_rl):
        raise CaiError(
            f"constitution.path: folder '{folder}' holds neither {SL_FILES[0]} nor {RL_FILES[0]}; "
            "point it at the prompts/ folder of the paper's repository, or at a .yaml constitution"
        )
    c = Constitution(name=f"paper:{folder.name}", source=str(folder))
    if has_sl:
        file = folder / SL_FILES[0]
        data = _json(file)
        if not isinstance(data, dict) or not data:
            raise CaiError(f"{file}: expected an object mapping principle ids to {{prompt, edit_request}}")
        for pid, entry in data.items():
            if not isinstance(entry, dict) or "prompt" not in entry or "edit_request" not in entry:
                missing = "prompt" if not isinstance(entry, dict) or "prompt" not in entry else "edit_request"
                raise CaiError(f"{file}: principle '{pid}': missing field '{missing}'")
            prompt = entry["prompt"][0] if isinstance(entry["prompt"], list) else entry["prompt"]
            critique = _between(prompt, "CritiqueRequest:", "Critique:")
            revision = _between(entry["edit_request"], "RevisionRequest:", "Revision:")
            if not critique or not revision:
                raise CaiError(f"{file}: principle '{pid}': field '{'prompt' if not critique else 'edit_request'}' has no request text")
            c.sl_principles.append(SLPrinciple(id=pid, critique=critique, revision=revision))
        shots = folder / SL_FILES[1]
        if shots.exists():
            for i, text in enumerate(_json(shots)):
                c.sl_examples.append(_paper_sl_example(shots, i, text))
    if has_rl:
        file = folder / RL_FILES[0]
        data = _json(file)
        if not isinstance(data, list) or not data:
            raise CaiError(f"{file}: expected a list of comparison questions")
        for i, q in enumerate(data):
            if not isinstance(q, str) or not q.strip():
                raise CaiError(f"{file}: principle {i}: field 'question' must be non-empty text")
            question = re.sub(r"\s*Options:\s*$", "", q.strip())
            c.rl_principles.append(RLPrinciple(id=f"rl{i}", question=question))
        shots = folder / RL_FILES[1]
        if shots.exists():
            for i, ex in enumerate(_json(shots)):
                for key in ("prompt", "corrects", "incorrects"):
                    if not isinstance(ex, dict) or not ex.get(key):
                        raise CaiError(f"{shots}: example {i}: missing field '{key}'")
                conv, _ = _paper_transcript(shots, i, ex["prompt"])
                c.rl_examples.append(RLExample(conversation=conv, chosen=ex["corrects"][0].strip(), rejected=ex["incorrects"][0].strip()))
    return c


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CaiError(f"{file}: not valid JSON ({err})") from None


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    if i < 0:
        return ""
    rest = text[i + len(start) :]
    j = rest.rfind(end)
    return (rest[:j] if j >= 0 else rest).strip()


def _paper_transcript(file: Path, i: int, text: str) -> tuple[list[Message], str | None]:
    """Split '\\n\\nHuman: ..\\n\\nAssistant: ..' into turns; a trailing assistant turn is the response."""
    turns = parse_transcript(text)
    while turns and not turns[-1]["content"]:
        turns.pop()  # a dangling "Assistant:" (or "Human:") with nothing after it
    response = None
    if turns and turns[-1]["role"] == "assistant":
        response = turns.pop()["content"]
    if not turns or turns[-1]["role"] != "user":
        raise CaiError(f"{file}: example {i}: field 'prompt' has no Human turn to answer")
    return turns, response


def _paper_sl_example(file: Path, i: int, text: str) -> SLExample:
    if not isinstance(text, str) or "CritiqueRequest:" not in text or "RevisionRequest:" not in text:
        raise CaiError(f"{file}: example {i}: must be a transcript with CritiqueRequest and RevisionRequest")
    head, tail = text.split("\n\nCritiqueRequest:", 1)
    conv, response = _paper_transcript(file, i, head)
    if response is None:
        raise CaiError(f"{file}: example {i}: no Assistant response before the CritiqueRequest")
    crit_req, tail = tail.split("\n\nCritique:", 1)
    critique, tail = tail.split("\n\nRevisionRequest:", 1)
    rev_req, revision = tail.split("\n\nRevision:", 1)
    revision = revision.split("\n\nHuman:")[0]
    return SLExample(
        conversation=conv,
        response=response,
        critique=critique.strip(),
        revision=revision.strip(),
        critique_request=crit_req.strip(),
        revision_request=rev_req.strip(),
    )
