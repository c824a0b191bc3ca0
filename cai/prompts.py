"""Chat formatting of the SL-CAI critique and revision steps.

The paper wrote critiques and revisions into one long plain-text transcript. Chat models follow
turns better than transcripts, so each step here is a conversation: the red-team prompt, the
model's latest answer, then the critique request (and, for the revision, the critique and the
revision request) as user turns. Few-shot examples from the constitution come first, as complete
earlier exchanges in the same format, so the model sees what a critique and a revision look like.
"""

from __future__ import annotations

import re

from cai.constitution import Constitution, SLExample, SLPrinciple

Message = dict[str, str]

CRITIQUE_PREFIX = "Critique request: "
REVISION_PREFIX = "Revision request: "
NO_CRITIQUE_NOTE = "Reply with the rewritten response only."
REVISION_NOTE = "Reply with the rewritten response only, as the assistant would say it to the human."


def _exchange(conversation: list[Message], response: str) -> list[Message]:
    return [*conversation, {"role": "assistant", "content": response}]


def _example_turns(ex: SLExample, constitution: Constitution, critique: bool) -> list[Message]:
    """One few-shot example as earlier turns: answer, critique request, critique, revision request, revision."""
    if ex.principle:
        p = constitution.sl_principle(ex.principle)
        crit_req, rev_req = p.critique, p.revision
    else:
        crit_req, rev_req = ex.critique_request or "", ex.revision_request or ""
    turns = _exchange(ex.conversation, ex.response)
    if critique:
        turns += [
            {"role": "user", "content": CRITIQUE_PREFIX + crit_req},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": f"{REVISION_PREFIX}{rev_req} {REVISION_NOTE}"},
        ]
    else:
        turns += [{"role": "user", "content": f"{REVISION_PREFIX}{rev_req} {NO_CRITIQUE_NOTE}"}]
    return turns + [{"role": "assistant", "content": ex.revision}]


def few_shot_turns(examples: list[SLExample], constitution: Constitution, critique: bool = True) -> list[Message]:
    out: list[Message] = []
    for ex in examples:
        out += _example_turns(ex, constitution, critique)
    return out


def critique_conversation(prompt: str, response: str, principle: SLPrinciple, shots: list[Message]) -> list[Message]:
    """Ask the model to critique its latest answer under one principle."""
    return [
        *shots,
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
        {"role": "user", "content": CRITIQUE_PREFIX + principle.critique},
    ]


def revision_conversation(prompt: str, response: str, principle: SLPrinciple, critique: str | None, shots: list[Message]) -> list[Message]:
    """Ask for the revision: after the critique, or straight away (`sl.critique=false`)."""
    turns = [*shots, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if critique is not None:
        turns += [
            {"role": "user", "content": CRITIQUE_PREFIX + principle.critique},
            {"role": "assistant", "content": critique},
            {"role": "user", "content": f"{REVISION_PREFIX}{principle.revision} {REVISION_NOTE}"},
        ]
    else:
        turns += [{"role": "user", "content": f"{REVISION_PREFIX}{principle.revision} {NO_CRITIQUE_NOTE}"}]
    return turns


_LABEL = re.compile(r"^\s*(\*\*)?(revision|revised response|critique|rewritten response)(\*\*)?\s*:\s*", re.IGNORECASE)


def clean(text: str) -> str:
    """Drop a leading 'Revision:' / 'Critique:' label that small models like to echo."""
    return _LABEL.sub("", text, count=1).strip()
