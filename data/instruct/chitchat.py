"""Real human conversations for SFT: the chitchat dataset (PyPI `chitchat-dataset==0.9.0`, MIT; 7,168
conversations between two people, collected by Alexa Prize team Chit-Chat) -> data.chat's jsonl:

    pip install chitchat-dataset==0.9.0
    python data/instruct/chitchat.py runs/chitchat/chat.jsonl [--max-turns 6]

The person who writes first is the user, the other the assistant; consecutive messages of one person
are one turn (joined by spaces). Each conversation keeps its first max_turns turns, ending with an
assistant turn; conversations with no assistant turn are left out.
"""

import argparse
import json
from pathlib import Path


def conversations(max_turns: int):
    import chitchat_dataset

    raw = json.loads((Path(chitchat_dataset.__file__).parent / "dataset.json").read_text(encoding="utf-8"))
    for key in sorted(raw):
        turns = [" ".join(m["text"].strip() for m in turn if m["text"].strip())
                 for turn in raw[key]["messages"]]
        turns = [t for t in turns if t][:max_turns]
        turns = turns[:len(turns) // 2 * 2]  # end with the second person's turn
        if turns:
            yield {"messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                for i, t in enumerate(turns)]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", help="jsonl to write")
    p.add_argument("--max-turns", type=int, default=6)
    a = p.parse_args(argv)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    records = list(conversations(a.max_turns))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    Path(a.output).write_text(lines, encoding="utf-8")
    print(f"{len(records)} conversations -> {a.output}")


if __name__ == "__main__":
    main()
