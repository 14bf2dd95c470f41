"""Tokens/s of finetui's generation core against plain `model.generate`, and batched against one prompt at a time.

Issue 11 asks that `engine.generation.generate` (left padding, end-of-turn tokens, a streamer that tracks each
answer and emits events) costs at most 5 % against calling transformers' `model.generate` directly with the same
settings, and that 64 prompts batched generate at 3x or more the throughput of one prompt at a time. Both sides
of each comparison run in turns (A B B A ...), `--repeat` times, on the same prompts (Alpaca instructions in the
model's chat template) and greedy decoding, so both produce the same tokens (checked); medians and their ratios
are reported, with the machine and its load average before and after (the 2 cores here are shared).

    python bench/generation.py [--model builtin:smollm2-135m] [--repeat 3] [--new-tokens 48] [--batch-prompts 64]

It prints the report as JSON and writes the table to bench/GENERATION.md (`--md`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from engine.config import ModelConfig
from engine.generation import end_token_ids, generate
from engine.models import load_model, load_tokenizer
from engine.sampling import GenerationSettings
from engine.sinks import ListSink

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000" / "alpaca_5000.json"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def prompts(tokenizer, count: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:count]
    texts = [row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "") for row in rows]
    chats = [[{"role": "user", "content": text}] for text in texts]
    rendered = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]


def plain_generate(model, prompt: list[int], new_tokens: int, end_ids: list[int], pad_id: int) -> list[int]:  # type: ignore[no-untyped-def]
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=end_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    tokens = out[0, len(prompt) :].tolist()
    return tokens[:-1] if tokens and tokens[-1] in end_ids else tokens


def timed(work) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def single(model, tokenizer, args: argparse.Namespace, end_ids: list[int]) -> dict:  # type: ignore[no-untyped-def]
    """One prompt at a time, streamed to a sink (as `finetui chat` and the try screen do) vs plain generate."""
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    chosen = prompts(tokenizer, args.single_prompts)
    rates: dict[str, list[float]] = {"finetui": [], "plain": []}
    outputs: dict[str, list[list[int]]] = {}
    for round_ in range(args.repeat):
        order = ("finetui", "plain") if round_ % 2 == 0 else ("plain", "finetui")
        for side in order:
            if side == "finetui":
                elapsed, answers = timed(
                    lambda: [
                        generate(model, tokenizer, [p], settings, end_ids=end_ids, sink=ListSink())[0] for p in chosen
                    ]
                )
                tokens = [answer.token_ids for answer in answers]  # type: ignore[attr-defined]
            else:
                elapsed, tokens = timed(
                    lambda: [plain_generate(model, p, args.new_tokens, end_ids, tokenizer.pad_token_id) for p in chosen]
                )
            outputs[side] = tokens  # type: ignore[assignment]
            rates[side].append(sum(len(t) for t in outputs[side]) / elapsed)
    same = outputs["finetui"] == outputs["plain"]
    finetui, plain = statistics.median(rates["finetui"]), statistics.median(rates["plain"])
    return {"prompts": len(chosen), "same_tokens": same, "finetui_tok_s": finetui, "plain_tok_s": plain,
            "ratio": finetui / plain, "runs": rates}  # fmt: skip


def batched(model, tokenizer, args: argparse.Namespace, end_ids: list[int]) -> dict:  # type: ignore[no-untyped-def]
    """`--batch-prompts` prompts in batches of `--batch-size` vs one at a time (batch_size=1)."""
    settings = GenerationSettings(max_new_tokens=args.batch_new_tokens)
    chosen = prompts(tokenizer, args.batch_prompts)
    rates: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    outputs: dict[str, list[list[int]]] = {}
    for round_ in range(args.repeat):
        order = ("batched", "one_at_a_time") if round_ % 2 == 0 else ("one_at_a_time", "batched")
        for side in order:
            size = args.batch_size if side == "batched" else 1
            elapsed, answers = timed(
                lambda size=size: generate(model, tokenizer, chosen, settings, end_ids=end_ids, batch_size=size)
            )
            outputs[side] = [answer.token_ids for answer in answers]  # type: ignore[attr-defined]
            rates[side].append(sum(len(t) for t in outputs[side]) / elapsed)
    batch, one = statistics.median(rates["batched"]), statistics.median(rates["one_at_a_time"])
    same = outputs["batched"] == outputs["one_at_a_time"]
    return {"prompts": len(chosen), "batch_size": args.batch_size, "same_tokens": same, "batched_tok_s": batch,
            "one_at_a_time_tok_s": one, "ratio": batch / one, "runs": rates}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48, help="max_new_tokens, one prompt at a time")
    parser.add_argument("--single-prompts", type=int, default=4)
    parser.add_argument("--batch-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-new-tokens", type=int, default=16, help="max_new_tokens, batched")
    parser.add_argument("--md", type=Path, default=ROOT / "bench" / "GENERATION.md")
    args = parser.parse_args()
    before = load()
    cfg = ModelConfig(id=args.model, task="causal")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, num_labels=None).eval()
    end_ids = end_token_ids(tokenizer, model.generation_config)
    report = {
        "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, fp32",
        "load_before": before,
    }
    with torch.inference_mode():
        report["single"] = single(model, tokenizer, args, end_ids)
        print(json.dumps({"single": report["single"]}), flush=True)  # kept if the batched part is cut short
        report["batched"] = batched(model, tokenizer, args, end_ids)
    report["load_after"] = load()
    print(json.dumps(report, indent=2))
    args.md.write_text(markdown(report, args), encoding="utf-8")


def markdown(report: dict, args: argparse.Namespace) -> str:
    single, batch = report["single"], report["batched"]
    runs = lambda values: ", ".join(f"{value:.1f}" for value in values)  # noqa: E731
    row = lambda *cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    table = [
        row("comparison", "finetui", "reference", "ratio (target)", "same tokens"),
        row(*["---"] * 5),
        row(
            f"one prompt at a time, streamed to a sink, {single['prompts']} prompts, max_new_tokens {args.new_tokens}",
            f"{single['finetui_tok_s']:.1f} tok/s",
            f"plain `model.generate`: {single['plain_tok_s']:.1f} tok/s",
            f"{single['ratio']:.2f}x (>= 0.95x)",
            str(single["same_tokens"]),
        ),
        row(
            f"{batch['prompts']} prompts, max_new_tokens {args.batch_new_tokens}",
            f"batches of {batch['batch_size']}: {batch['batched_tok_s']:.1f} tok/s",
            f"one at a time: {batch['one_at_a_time_tok_s']:.1f} tok/s",
            f"{batch['ratio']:.2f}x (>= 3x)",
            str(batch["same_tokens"]),
        ),
    ]
    return f"""# Generation throughput

`python bench/generation.py {" ".join(sys.argv[1:])}` on {report["model"]}: {report["machine"]}.
Load average (1, 5, 15 min) before {report["load_before"]}, after {report["load_after"]}: the 2 cores are shared
with other engineers' tests, so single runs vary; both sides of each row ran in turns and the medians are compared.
Greedy decoding; the prompts are Alpaca instructions in the model's chat template.

{chr(10).join(table)}

Each run (tok/s): finetui {runs(single["runs"]["finetui"])}; plain {runs(single["runs"]["plain"])};
batched {runs(batch["runs"]["batched"])}; one at a time {runs(batch["runs"]["one_at_a_time"])}.
"""


if __name__ == "__main__":
    main()
