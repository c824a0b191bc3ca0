"""Turn hh-rlhf transcripts (red-team-attempts' `transcript`, or `chosen`) into a cai prompt file: the first human turn of each.

python recipes/to_prompts.py red_team_attempts.jsonl.gz red_team.jsonl
"""

from __future__ import annotations

import gzip
import json
import sys

from cai.data import parse_transcript


def main(source: str, target: str) -> None:
    opener = gzip.open if source.endswith(".gz") else open
    with opener(source, "rt", encoding="utf-8") as f:
        text = f.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    seen, n = set(), 0
    with open(target, "w", encoding="utf-8") as out:
        for row in rows:
            prompt = parse_transcript(row.get("transcript") or row["chosen"])[0]["content"].strip()
            if prompt and prompt not in seen:  # the same opening turn is one prompt
                seen.add(prompt)
                out.write(json.dumps({"prompt": prompt}) + "\n")
                n += 1
    print(f"{target}: {n} prompts from {len(rows)} transcripts")


if __name__ == "__main__":
    main(*sys.argv[1:3])
