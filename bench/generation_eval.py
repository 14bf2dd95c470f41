"""Rows/s of generation-based evaluation (`finetui eval --generate`), batched against one prompt at a time.

`eval --generate` answers every row through the one generation core (`engine.generation.generate`: left-padded
batches, KV cache, greedy) and scores the answers. This times that path on SmolLM2-135M-Instruct (fp32, CPU or the
GPU there is) for two workloads: Rotten Tomatoes reviews as label words (answers of a few tokens, the prompt
dominates) and GSM8K questions (answers up to `--gsm8k-tokens` tokens), each with `--batch` prompts per batch and
with one prompt per batch, in turns (`--rounds`), reporting the median rows/s and the ratio, and checking that both
give the same answers (greedy decoding). Prompts are rendered by `engine.data.prompt_token_ids` as a run renders
them; the data is read in place from ../shared/data.

    python bench/generation_eval.py [--rows 32] [--batch 16] [--rounds 2] [--gsm8k-tokens 48] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from engine import data as data_lib
from engine import generation_metrics as gm
from engine.config import DataConfig, ModelConfig
from engine.generation import end_token_ids, generate
from engine.models import load_model, load_tokenizer
from engine.sampling import GenerationSettings

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def workloads(rows: int, gsm8k_tokens: int) -> dict[str, tuple[DataConfig, list[dict], list[str], int]]:
    """name -> (data config, rows, references, max_new_tokens)."""
    reviews = [json.loads(line) for line in (SHARED / "rotten_tomatoes" / "validation.jsonl").open()][::7][:rows]
    words = DataConfig(train="x.jsonl", template="chat", label_words={"0": "negative", "1": "positive"})
    questions = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").open()][:rows]
    maths = DataConfig(train="x.jsonl", template="chat")
    asked = [{"instruction": question["question"]} for question in questions]
    return {
        "rotten_tomatoes label words": (words, reviews, [words.label_words[str(r["label"])] for r in reviews], 10),
        "gsm8k questions": (maths, asked, [question["answer"] for question in questions], gsm8k_tokens),
    }


def timed(model, tokenizer, prompts, settings, batch: int) -> tuple[float, list[str]]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    end_ids = end_token_ids(tokenizer, model.generation_config)
    answers = generate(model, tokenizer, prompts, settings, end_ids=end_ids, batch_size=batch)
    return time.perf_counter() - started, [answer.text.strip() for answer in answers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gsm8k-tokens", type=int, default=48)
    parser.add_argument("--md", type=Path, default=ROOT / "bench" / "GENERATION_EVAL.md")
    args = parser.parse_args()
    load_before = load()
    cfg = ModelConfig(id="builtin:smollm2-135m", task="causal")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, model = load_tokenizer(cfg), load_model(cfg, num_labels=None).to(device).eval()
    lines = []
    for name, (data, rows, references, new_tokens) in workloads(args.rows, args.gsm8k_tokens).items():
        prompts = [data_lib.prompt_token_ids(data, tokenizer, row) for row in rows]
        settings = GenerationSettings(max_new_tokens=new_tokens)
        times: dict[int, list[float]] = {args.batch: [], 1: []}
        outputs: dict[int, list[str]] = {}
        for _ in range(args.rounds):
            for batch in (args.batch, 1):
                seconds, outputs[batch] = timed(model, tokenizer, prompts, settings, batch)
                times[batch].append(seconds)
        batched, alone = (len(rows) / statistics.median(times[batch]) for batch in (args.batch, 1))
        metric = gm.default_metric(references)
        score = gm.score_answers(metric, outputs[args.batch], references).score
        same = outputs[args.batch] == outputs[1]
        lines.append(
            f"| {name} | {len(rows)} | {new_tokens} | {alone:.2f} | {batched:.2f} | {batched / alone:.2f}x | "
            f"{'yes' if same else 'no'} | {metric} {score:.3f} |"
        )
        print(lines[-1], flush=True)
    report = [
        "# Generation-based evaluation: batched against one by one",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, "
        f"torch {torch.__version__}; SmolLM2-135M-Instruct (zero-shot, fp32), greedy.",
        f"- Load average (1, 5, 15 min) before / after: {load_before} / {load()}",
        f"- Batch {args.batch} against batch 1, in turns, {args.rounds} rounds each; median rows/s.",
        "",
        "| workload | rows | max new tokens | rows/s one by one | rows/s batched | speed-up | same answers | score |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"`python bench/generation_eval.py --rows {args.rows} --batch {args.batch} --rounds {args.rounds} "
        f"--gsm8k-tokens {args.gsm8k_tokens}`",
    ]
    args.md.write_text("\n".join(report) + "\n")
    print(f"written to {args.md}")


if __name__ == "__main__":
    main()
