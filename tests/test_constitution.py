"""Constitution files: our YAML schema, the paper authors' JSON format, validation and drawing."""

from __future__ import annotations

import random
import shutil

import pytest
import yaml
from conftest import PAPER_FORMAT, PAPER_PROMPTS, needs_shared_data

import cai
from cai.constitution import load_constitution
from cai.errors import CaiError

DEFAULT = cai.CONSTITUTIONS / "default.yaml"


def test_default_constitution_has_16_sl_and_16_rl_principles():
    c = load_constitution(str(DEFAULT))
    assert len(c.sl_principles) == 16 and len(c.rl_principles) == 16
    assert len({p.id for p in c.sl_principles}) == 16 and len({p.id for p in c.rl_principles}) == 16
    assert c.sl_examples and c.rl_examples
    for p in c.sl_principles:
        assert p.critique.strip() and p.revision.strip()
    # the counterweights the paper added against preachy, accusatory and evasive answers
    for pid in ("not-preachy", "not-accusatory", "not-evasive", "age-appropriate"):
        assert c.rl_principle(pid)
        assert c.sl_principle(pid)


@needs_shared_data
def test_default_constitution_is_our_own_text():
    ours = DEFAULT.read_text().lower()
    paper = " ".join(p.read_text().lower() for p in PAPER_PROMPTS.glob("*.json"))
    # no sentence of 8+ words from the paper's files appears in ours
    import re

    words = re.findall(r"[a-z']+", paper)
    grams = {" ".join(words[i : i + 8]) for i in range(len(words) - 8)}
    ours_words = re.findall(r"[a-z']+", ours)
    shared = [" ".join(ours_words[i : i + 8]) for i in range(len(ours_words) - 8) if " ".join(ours_words[i : i + 8]) in grams]
    assert not shared, shared[:3]


def test_paper_json_format_loads_from_a_folder():
    c = load_constitution(str(PAPER_FORMAT))
    assert len(c.sl_principles) == 2 and len(c.rl_principles) == 2
    assert len(c.sl_examples) == 2 and len(c.rl_examples) == 2
    ex = c.sl_examples[0]
    assert ex.conversation[-1]["role"] == "user" and ex.response and ex.critique and ex.revision
    assert ex.critique_request and ex.revision_request
    assert "CritiqueRequest" not in ex.revision and "Human:" not in ex.revision
    assert not c.rl_principles[0].question.endswith("Options:")
    rl = c.rl_examples[0]
    assert rl.chosen != rl.rejected and rl.conversation[0]["role"] == "user"


@needs_shared_data
def test_the_paper_authors_own_files_load():
    c = load_constitution(str(PAPER_PROMPTS))
    assert len(c.sl_principles) == 16 and len(c.rl_principles) == 16
    assert len(c.sl_examples) == 5 and len(c.rl_examples) == 5


def test_paper_folder_with_only_rl_files(tmp_path):
    for name in ("RLMadisonInstructions.json", "RLMadisonFewShotPrompts.json"):
        shutil.copy(PAPER_FORMAT / name, tmp_path / name)
    c = load_constitution(str(tmp_path))
    assert not c.sl_principles and len(c.rl_principles) == 2
    with pytest.raises(CaiError, match="no SL principles"):
        c.draw_sl(random.Random(0))


def test_drawing_principles():
    rng = random.Random(0)
    one = load_constitution(str(DEFAULT), ensemble_size=1)
    assert len(one.draw_rl(rng)) == 1
    four = load_constitution(str(DEFAULT), ensemble_size=4)
    drawn = four.draw_rl(rng)
    assert len(drawn) == 4 and len({p.id for p in drawn}) == 4
    assert len(load_constitution(str(DEFAULT), ensemble_size=0).draw_rl(rng)) == 16
    single = load_constitution(str(DEFAULT), principle="honest")
    assert [p.id for p in single.draw_rl(rng)] == ["honest"]
    ids = {one.draw_sl(rng).id for _ in range(200)}
    assert len(ids) > 10  # uniform over the 16 SL principles


def _broken(tmp_path, mutate) -> str:
    data = yaml.safe_load(DEFAULT.read_text())
    mutate(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (
            lambda d: d["sl"]["principles"][2].pop("revision"),
            r"broken.yaml: sl.principles\[2\] \(id 'dangerous-instructions'\): missing field 'revision'",
        ),
        (lambda d: d["rl"]["principles"][0].pop("question"), r"rl.principles\[0\] \(id 'harmless-ethical'\): missing field 'question'"),
        (
            lambda d: d["rl"]["principles"][1].update(questoin="x"),
            r"rl.principles\[1\] \(id 'helpful-honest-harmless'\): unknown field 'questoin'",
        ),
        (lambda d: d["sl"]["principles"][1].update(id="harm-broad"), r"sl.principles\[1\] \(id 'harm-broad'\): duplicate id"),
        (lambda d: d["rl"]["principles"][3].update(question="  "), r"field 'question' must be non-empty"),
        (lambda d: d.pop("name"), r"missing field 'name'"),
        (lambda d: d["sl"]["few_shot"][0].update(principle="nope"), r"sl.few_shot\[0\]: field 'principle' names 'nope'"),
    ],
)
def test_errors_name_file_principle_and_field(tmp_path, mutate, expected):
    with pytest.raises(CaiError, match=expected):
        load_constitution(_broken(tmp_path, mutate))


def test_unknown_principle_and_missing_path():
    with pytest.raises(CaiError, match="no RL principle with id 'nope'; the ids are: harmless-ethical"):
        load_constitution(str(DEFAULT), principle="nope")
    with pytest.raises(CaiError, match="constitution.path: 'missing.yaml' does not exist"):
        load_constitution("missing.yaml")


def test_paper_format_errors_name_the_file(tmp_path):
    (tmp_path / "CritiqueRevisionInstructions.json").write_text('{"harmful0": {"prompt": ["x"]}}')
    with pytest.raises(CaiError, match=r"CritiqueRevisionInstructions.json: principle 'harmful0': missing field 'edit_request'"):
        load_constitution(str(tmp_path))


def test_digest_tracks_content():
    a = load_constitution(str(DEFAULT))
    b = load_constitution(str(DEFAULT), ensemble_size=0, variant="ensemble")
    assert a.digest() == b.digest()
    assert a.digest() != load_constitution(str(PAPER_FORMAT)).digest()
