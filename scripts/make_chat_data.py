"""AG News as instructions for configs/sft_chat.yaml: the data as chat rows, and the small chat model it trains.

``data``: each headline (the AG News text, cut to its first words) becomes a user turn asking for its topic, and
the topic name (World, Sports, Business, Sci/Tech) the assistant's answer, written as jsonl with a ``messages``
column (OpenAI style, what ``data.*.messages_column`` reads)::

    {"messages": [{"role": "user", "content": "Topic (World, Sports, Business or Sci/Tech)? Wall St. ..."},
                  {"role": "assistant", "content": "Business"}]}

``model``: the Llama of scripts/make_causal_lm.py (random weights, MiniLM's tokenizer) with the ChatML markers
``<|im_start|>`` and ``<|im_end|>`` added to the tokenizer as special tokens and ``<|im_end|>`` as its
end-of-text token: the ChatML-style template in configs/sft_chat.yaml closes every turn with it, so an answer ends
where the model learns to stop, and decoding without special tokens leaves the answer's text alone. (MiniLM's
tokenizer would split an unknown marker into seven word pieces that a decoded answer would keep.)

    python scripts/make_chat_data.py data runs/data/agnews-chat      # train.jsonl and test.jsonl
    python scripts/make_chat_data.py model runs/models/chat-llama    # about 11M parameters
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPICS = ("World", "Sports", "Business", "Sci/Tech")
QUESTION = "Topic (World, Sports, Business or Sci/Tech)? "
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")


def clean(text: str) -> str:
    """AG News text as readable words: its HTML escapes (also the ``#39;`` form that lost its ampersand) decoded,
    its markup (links to quote pages) dropped, the tsv's doubled quotes and line-break backslashes undone."""
    text = re.sub(r"(?<!&)#(\d+);", r"&#\1;", text)
    text = html.unescape(html.unescape(text))  # some escapes are escaped twice (&amp;lt;)
    text = re.sub(r"<[^>]*>", " ", text).replace("\\", " ")
    if len(text) > 1 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('""', '"')
    return " ".join(text.split())


def chat_row(text: str, topic: str, *, max_words: int = 40) -> dict[str, list[dict[str, str]]]:
    """One AG News row as a two-turn chat: the question with the headline's first ``max_words`` words (most of
    AG News fits; the few long ones would only slow training), and the topic as the answer."""
    headline = " ".join(clean(text).split()[:max_words])
    return {"messages": [{"role": "user", "content": QUESTION + headline}, {"role": "assistant", "content": topic}]}


def convert(source: str | Path, destination: str | Path, *, max_words: int = 40) -> int:
    """Write the AG News tsv ``source`` (``text<TAB>topic``, no header) as chat rows to the jsonl
    ``destination``; returns the rows written.

    Raises:
        ValueError: a line that is not ``text<TAB>topic`` with a known topic, naming file and line.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(source, encoding="utf-8") as rows, open(destination, "w", encoding="utf-8") as out:
        for number, line in enumerate(rows, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2 or fields[1] not in TOPICS or not fields[0].strip():
                raise ValueError(f"{source}:{number}: expected text<TAB>topic with a topic among {TOPICS}")
            out.write(json.dumps(chat_row(fields[0], fields[1], max_words=max_words)) + "\n")
            written += 1
    return written


def build_chat_model(destination: str | Path, *, hidden: int = 256, layers: int = 4, seed: int = 0) -> Path:
    """The random-weight Llama of ``make_causal_lm.build`` with the ChatML markers as special tokens and
    ``<|im_end|>`` as end-of-text (model config, generation config and tokenizer); returns ``destination``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "scripts"))
    from make_causal_lm import build

    path = build(destination, hidden=hidden, layers=layers, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_MARKERS), "eos_token": CHAT_MARKERS[1]})
    model = LlamaForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    end = tokenizer.convert_tokens_to_ids(CHAT_MARKERS[1])
    model.config.eos_token_id = model.generation_config.eos_token_id = end
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="AG News train/test as chat rows (train.jsonl, test.jsonl).")
    data.add_argument("destination", type=Path, help="Folder to write (e.g. runs/data/agnews-chat).")
    data.add_argument(
        "--source",
        type=Path,
        default=REPO.parent / "shared" / "data" / "agnews",
        help="Folder with AG News train.tsv and test.tsv (default ../shared/data/agnews).",
    )
    data.add_argument("--max-words", type=int, default=40, help="Words of each headline kept (default 40).")
    model = commands.add_parser("model", help="The small chat Llama (random weights, MiniLM's tokenizer).")
    model.add_argument("destination", type=Path, help="Folder to write (e.g. runs/models/chat-llama).")
    model.add_argument("--hidden", type=int, default=256, help="Hidden width (default 256).")
    model.add_argument("--layers", type=int, default=4, help="Transformer blocks (default 4).")
    model.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args(argv)
    if args.command == "data":
        for split in ("train", "test"):
            count = convert(args.source / f"{split}.tsv", args.destination / f"{split}.jsonl", max_words=args.max_words)
            print(f"wrote {count} chat rows to {args.destination / f'{split}.jsonl'}")
        return
    if (args.destination / "config.json").exists():
        sys.exit(f"{args.destination} already holds a model; remove it or choose another folder")
    path = build_chat_model(args.destination, hidden=args.hidden, layers=args.layers, seed=args.seed)
    print(f"wrote a {args.layers}-block, {args.hidden}-wide chat Llama with random weights to {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from a checkout: `orchestrator` without an install
    main()
