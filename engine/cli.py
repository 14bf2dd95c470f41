"""The headless command line: `finetui run | attach | inspect | data | eval | generate | chat | export | diff |
rerun | presets`.

Exit codes: 0 done, 1 training failed, 2 bad input (one line on stderr, never a traceback),
130/143/129 stopped by SIGINT/SIGTERM/SIGHUP (the run is checkpointed and resumable with `--resume`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from engine.config import ConfigError, RunConfig, load_config, read_preset_file
from engine.events import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_STOPPED
from engine.generation_metrics import METRICS
from engine.inference import checks
from engine.notify import alert_terminal, end_message
from engine.parallel import LAUNCHED_ENV
from engine.preflight import check_data_config, check_model, check_run_config
from engine.presets import bundled_presets, resolve_preset
from engine.runs import CONFIG_FILE, check_resumable, load_run_config, override_resumed_config, read_summary
from engine.sampling import GenerationSettings
from engine.sinks import EventSink, GuardedSink, JsonLinesSink
from engine.views import (
    AnswerStream,
    ExportProgressLines,
    RichProgressSink,
    TextLogSink,
    answer_stats,
    freeze_map_table,
    judged_line,
    label_bars,
    memory_table,
    worst_row_lines,
)

SUBCOMMANDS = ("run", "attach", "inspect", "data", "eval", "generate", "chat", "export", "diff", "rerun", "presets")


def _overrides(args: argparse.Namespace) -> list[str]:
    shortcuts = []
    if getattr(args, "model", None):
        shortcuts.append(f"model.id={json.dumps(args.model)}")
    if getattr(args, "strategy", None):
        shortcuts.append(f"strategy.kind={args.strategy}")
    if getattr(args, "nproc", None):
        shortcuts.append(f"train.nproc={args.nproc}")
    return [*shortcuts, *args.set]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def _install_stop_handlers(stop_event: threading.Event, received: list[int], *, detached_child: bool) -> None:
    """SIGINT/SIGTERM (and SIGHUP from a closing terminal) ask the run to stop at the next step and checkpoint.

    A second signal ends the process at once. A detached run ignores SIGHUP: it has no terminal to lose.
    """

    def request_stop(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop_event.set()
        signal.signal(signum, signal.SIG_DFL)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN if detached_child else request_stop)


def _check_resume(args: argparse.Namespace) -> Path:
    """The run directory `--resume` continues, checked (and its config updated with the allowed `--set`s)."""
    options = {
        "PRESET": args.preset,
        "--model": args.model,
        "--strategy": args.strategy,
        "--output-dir": args.output_dir,
    }
    given = [flag for flag, value in options.items() if value]
    if given:
        raise ConfigError(f"--resume continues a run with the config.toml in its directory; drop {', '.join(given)}")
    run_dir = Path(args.resume)
    if args.nproc and args.nproc != load_run_config(run_dir).train.nproc:
        raise ConfigError(
            f"--nproc {args.nproc}: the run trains with train.nproc = {load_run_config(run_dir).train.nproc} "
            "(its checkpoints hold that global batch); drop --nproc"
        )
    if args.set:
        override_resumed_config(run_dir, args.set)
    else:
        check_resumable(run_dir)
    return run_dir


def cmd_run(args: argparse.Namespace) -> int:
    config: RunConfig | None = None
    if args.resume:
        run_dir = _check_resume(args)
    else:
        config = load_config(resolve_preset(args.preset) if args.preset else None, _overrides(args))
        check_run_config(config, args.output_dir)
    if args.detach:
        from engine.api import resume_detached, start_detached

        started = resume_detached(run_dir) if config is None else start_detached(config, output_dir=args.output_dir)
        if args.json:
            _print_json({"run_dir": str(started)})
        else:
            sys.stdout.write(f"{started}\n")
            sys.stderr.write(f"finetui: detached; follow it with: finetui attach {started}\n")
        return 0

    view: EventSink = JsonLinesSink() if args.json else RichProgressSink()
    sink: EventSink = TextLogSink() if args.detached_child else GuardedSink(view)
    stop_event = threading.Event()
    received: list[int] = []
    if not os.environ.get(LAUNCHED_ENV):  # a worker of `--nproc` stops through the stop file; SIGTERM ends it
        _install_stop_handlers(stop_event, received, detached_child=args.detached_child)
    from engine.api import resume_training, run_training

    if received and config is not None:
        return 128 + received[0]  # stopped while starting up: nothing was created
    if config is None:
        result = resume_training(run_dir, sink, stop_event=stop_event, signal_stop=True)
    else:
        result = run_training(config, sink, output_dir=args.output_dir, stop_event=stop_event, signal_stop=True)
    if result.status == "failed":
        sys.stderr.write(f"finetui: error: {result.summary['error']} (run directory: {result.run_dir})\n")
    if result.status == "stopped" and received:
        return 128 + received[0]
    return result.exit_code


def cmd_attach(args: argparse.Namespace) -> int:
    """Follow a run (usually a detached one) live; Ctrl-C asks it to stop, a second Ctrl-C leaves it running."""
    from engine.launch.follow import ProcessVanished, follow_run

    run_dir = Path(args.run_dir)
    sink = GuardedSink(JsonLinesSink() if args.json else RichProgressSink(show_errors=True))
    interrupts: list[int] = []

    def on_sigint(signum: int, _frame: Any) -> None:
        interrupts.append(signum)
        if len(interrupts) > 1:
            sys.stderr.write(f"finetui: left {run_dir}; it goes on stopping (finetui attach to follow it again)\n")
            os._exit(EXIT_STOPPED)

    def on_stop_sent(sent: bool) -> None:
        if sent:
            sys.stderr.write("finetui: asked the run to stop; it saves a checkpoint first (Ctrl-C again to leave)\n")
        else:
            sys.stderr.write("finetui: the run's process is not running; nothing to stop\n")

    signal.signal(signal.SIGINT, on_sigint)
    try:
        code = follow_run(run_dir, sink, should_stop=lambda: bool(interrupts), on_stop_sent=on_stop_sent)
        alert_terminal(end_message(read_summary(run_dir) or {"run_dir": str(run_dir)}), sys.stderr)
        return code
    except ProcessVanished as exc:
        sys.stderr.write(f"finetui: error: {exc}\n")
        return EXIT_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    if not args.preset and not args.model:
        raise ConfigError("inspect needs a preset or --model (e.g. finetui inspect --model builtin:minilm-l6)")
    config = load_config(resolve_preset(args.preset) if args.preset else None, _overrides(args))
    check_model(config.model)
    from engine.inspect import inspect_config

    report = inspect_config(config)
    if args.json:
        _print_json(report)
        return 0
    console = Console()
    console.print(f"[bold]model[/]     {report['model']}", overflow="fold")
    console.print(f"[bold]strategy[/]  {report['strategy']}")
    console.print(freeze_map_table(report))
    if report.get("memory"):
        console.print(memory_table(report["memory"]))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Report the data a run would train on; exit 2 (after the report) when `run` would refuse it."""
    config = load_config(resolve_preset(args.preset) if args.preset else None, _overrides(args))
    check_data_config(config)
    from engine.data_report import build_report, render_report

    report = build_report(config)
    if args.json:
        _print_json(report.to_dict())
    else:
        Console().print(render_report(report))
    if report.error is not None:
        raise ConfigError(report.error)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Loss-based metrics of a run on a data file; with --generate, its generated answers scored."""
    if args.generate or args.metric or args.base:
        return _generate_eval(args)
    checks.usable_run(Path(args.run_dir))
    checks.check_data_file(args.data)
    from engine.inference.evaluate import evaluate_run

    metrics = evaluate_run(Path(args.run_dir), args.data, args.set)
    if args.json:
        _print_json(metrics)
    else:
        Console().print("  ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _generate_eval(args: argparse.Namespace) -> int:
    """`eval --generate`: answer every row, score the answers (and the base model's with --base), print the score
    with its interval and the worst rows, and keep predictions.jsonl and result.json in the run's evaluations/."""
    run = checks.usable_run(Path(args.run_dir))
    checks.check_generate_eval(run, args.metric, generate=args.generate, base=args.base)
    checks.check_data_file(args.data)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: give 1 or more prompts per batch")
    settings = _settings(args)
    from engine.inference import generation_eval as ge
    from engine.inference.loading import load_run

    request = ge.check_request(load_run_config(run.run_dir, args.set), args.data, args.metric)
    loaded = load_run(run.run_dir, overrides=args.set)
    for note in loaded.notes:
        sys.stderr.write(f"finetui: {note}\n")
    if request.words and args.max_new_tokens is None:
        settings = ge.label_word_settings(loaded, settings)
    judged = [ge.judge(loaded, request, settings, batch_size=args.batch_size)]
    if args.base:
        judged.append(ge.judge(loaded, request, settings, base=True, batch_size=args.batch_size))
    records = ge.prediction_records(loaded, request, judged)
    result = judged[0].record() | ({"base": judged[1].record()} if args.base else {})
    saved = ge.save_evaluation(run.run_dir, args.data, records, result | {"data": str(Path(args.data).resolve())})
    if args.json:
        _print_json(judged[0].summary() | ({"base": judged[1].summary()} if args.base else {}))
    else:
        for judgement in judged:
            sys.stdout.write(judged_line(judgement.model, judgement.record()) + "\n")
        sys.stdout.write("worst rows (fine-tuned):\n" + "\n".join(worst_row_lines(ge.worst_rows(records))) + "\n")
    sys.stderr.write(f"finetui: predictions written to {saved}\n")
    return 0


def _settings(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings.checked(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer a prompt (or every row of --data) with a run's model, the base model, or both."""
    run = _check_generate(args)
    settings = _settings(args)
    from engine.inference import predict
    from engine.inference.loading import load_run

    loaded = load_run(run.run_dir)
    for note in loaded.notes:
        sys.stderr.write(f"finetui: {note}\n")
    rows = predict.request_rows(loaded, prompt=args.prompt, data=args.data)
    stream = not args.json and args.prompt is not None
    if loaded.task == "classification":
        records = _classified(loaded, rows, show=stream)
    else:
        records = _generated(loaded, rows, settings, args, stream=stream)
    for row, record in zip(rows, records, strict=True):
        reference = predict.row_reference(loaded.config.data, row, loaded.task)
        if args.data is not None and reference is not None:
            record["reference"] = reference
        if args.json:
            _print_json(record)
    if args.data is not None:
        from engine.fsio import write_atomic

        write_atomic(args.out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        sys.stderr.write(f"finetui: {len(records)} predictions written to {args.out}\n")
    return 0


def _check_generate(args: argparse.Namespace) -> checks.UsableRun:
    """What the command line and the run folder show, checked before torch loads."""
    run = checks.usable_run(Path(args.run_dir))
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: give 1 or more prompts per batch")
    if args.prompt is not None:
        checks.check_prompts([args.prompt])
    else:
        checks.check_data_file(args.data)
    if args.base or args.compare:
        checks.check_base(run)
    return run


def _classified(loaded: Any, rows: list[dict[str, Any]], *, show: bool) -> list[dict[str, Any]]:
    from engine.inference.predict import label_probabilities, row_prompt

    prompts = [row_prompt(loaded.config.data, row, loaded.task) for row in rows]
    answers = label_probabilities(loaded, prompts)
    if show:
        sys.stdout.write(label_bars(answers[0].probabilities) + "\n")
    return [
        {
            "prompt": prompt,
            "label_probabilities": answer.probabilities,
            "label": answer.label,
            "tokens": answer.tokens,
            "tokens_per_second": answer.tokens_per_second,
        }
        for prompt, answer in zip(prompts, answers, strict=True)
    ]


def _generated(
    loaded: Any, rows: list[dict[str, Any]], settings: GenerationSettings, args: argparse.Namespace, *, stream: bool
) -> list[dict[str, Any]]:
    """Answers of the fine-tuned model (`--base`: the base; `--compare`: both, base first), as JSON records."""
    from engine.inference.predict import BASE, FINE_TUNED, answer, row_prompt

    models = [BASE, FINE_TUNED] if args.compare else [BASE] if args.base else [FINE_TUNED]
    records = [{"prompt": row_prompt(loaded.config.data, row, "causal")} for row in rows]
    for name in models:
        if stream and len(models) > 1:
            sys.stdout.write(f"── {name} ──\n")
        sink = AnswerStream() if stream else None
        answers = answer(loaded, rows, settings, base=name == BASE, sink=sink, batch_size=args.batch_size)
        for record, reply in zip(records, answers, strict=True):
            fields = {"output": reply.text, "tokens": reply.tokens, "tokens_per_second": reply.tokens_per_second}
            if name == models[-1]:
                record.update(fields, model=name)
            else:
                record[BASE] = fields
        if stream:
            sys.stdout.write("\n")
            sys.stderr.write(
                f"({name}: {answer_stats(answers[0].tokens, answers[0].tokens_per_second, answers[0].stop_reason)})\n"
            )
    return records


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn conversation with a run's causal LM on the terminal, streamed; Ctrl-D ends it."""
    run = checks.usable_run(Path(args.run_dir))
    checks.check_chat(run)
    settings = _settings(args)
    from engine.inference.loading import load_run
    from engine.inference.predict import Chat

    loaded = load_run(run.run_dir)
    for note in loaded.notes:
        sys.stderr.write(f"finetui: {note}\n")
    chat = Chat(loaded, settings)
    sys.stderr.write(
        f"finetui: chatting with {run.run_dir.name} (fine-tuned). /base switches to the base model and back, "
        "/reset clears the conversation, Ctrl-C stops an answer, Ctrl-D ends.\n"
    )
    while True:
        try:
            text = (input("you> ") if sys.stdin.isatty() else input()).strip()
        except EOFError:
            if sys.stdin.isatty():
                sys.stdout.write("\n")  # the shell's prompt starts on its own line
            return 0
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            continue
        if text:
            _chat_turn(chat, text)


def _chat_turn(chat: Any, text: str) -> None:
    """One line of `finetui chat`: a command (/reset, /base) or a message answered as it is generated."""
    if text == "/reset":
        chat.reset()
        sys.stderr.write("(conversation cleared)\n")
        return
    if text == "/base":
        chat.base = not chat.base
        sys.stderr.write(f"(now answering: {'base' if chat.base else 'fine-tuned'} model)\n")
        return
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    try:
        reply = chat.reply(text, sink=AnswerStream(), stop=stop)
    except ConfigError as exc:  # the base of a full run does not fit in memory
        chat.base = False
        sys.stderr.write(f"finetui: {exc}\n")
        return
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    sys.stderr.write(f"({answer_stats(reply.tokens, reply.tokens_per_second, reply.stop_reason)})\n")


def cmd_export(args: argparse.Namespace) -> int:
    """A merged (or adapter-only) folder that plain transformers loads, checked against the run before it is
    published; exit 1 and nothing written when it does not answer as the run does."""
    out = Path(args.out)
    checks.check_export(checks.usable_run(Path(args.run_dir)), out, adapter_only=args.adapter_only, dtype=args.dtype)
    from engine.inference.export import ExportMismatch, export_run

    sink = None if args.json else ExportProgressLines()
    try:
        result = export_run(Path(args.run_dir), out, dtype=args.dtype, adapter_only=args.adapter_only, sink=sink)
    except ExportMismatch as exc:
        if args.json:
            _print_json(exc.result.to_dict())
        sys.stderr.write(f"finetui: error: {exc}\n")
        return EXIT_FAILED
    if args.json:
        _print_json(result.to_dict())
        return 0
    for note in result.notes:
        sys.stderr.write(f"finetui: {note}\n")
    answers = "same greedy answers" if result.same_greedy else "different answers"
    sys.stdout.write(
        f"exported to {result.out}: {answers} on {result.prompts} prompts, largest log-prob difference "
        f"{result.max_logprob_diff:.3g} (tolerance {result.tolerance:g})\n"
    )
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """What differs between two runs: config keys, environment, data files, final metrics, loss curves."""
    from engine.run_diff import diff_lines, diff_runs

    diff = diff_runs(Path(args.run_a), Path(args.run_b))
    if args.json:
        _print_json(diff.to_dict())
    else:
        sys.stdout.write("\n".join(diff_lines(diff)) + "\n")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    """A new run with a run's recorded config.toml, after a warning for each way this machine differs from it."""
    from engine.environment import rerun_warnings

    run_dir = Path(args.run_dir)
    for warning in rerun_warnings(run_dir):
        sys.stderr.write(f"finetui: warning: {warning}\n")
    defaults = vars(build_parser().parse_args(["run"]))
    output_dir = args.output_dir or run_dir.parent
    rerun = {"preset": str(run_dir / CONFIG_FILE), "output_dir": output_dir, "json": args.json}
    return cmd_run(argparse.Namespace(**{**defaults, **rerun}))


def _section_keys(section: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, field in section.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_section_keys(annotation, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", repr(default), field.description or ""))
    return rows


def preset_keys() -> list[tuple[str, str, str]]:
    """Every preset key with its default and description, from the pydantic models themselves."""
    return _section_keys(RunConfig, "")


def cmd_presets(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    if args.keys:
        for key, default, description in preset_keys():
            console.print(f"[bold]{key}[/] = {default}  [dim]{description}[/]")
        return 0
    for path in bundled_presets():
        data = read_preset_file(path)
        model = data.get("model", {}).get("id", "")
        strategy = data.get("strategy", {}).get("kind", "")
        console.print(f"[bold]{path.stem:<28}[/] {strategy:<12} {model:<32} {data.get('description', '')}")
    return 0


SET_HELP = "override a preset key, e.g. --set train.lr=2e-4 (repeatable; see `finetui presets --keys`)"
Subparsers = Any  # argparse's _SubParsersAction


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    """Decoding options (`engine.sampling.GenerationSettings`): greedy unless --temperature is above 0."""
    parser.add_argument("--max-new-tokens", type=int, help="the most tokens per answer (default 256)")
    parser.add_argument("--temperature", type=float, help="0 (default) decodes greedily; above 0 samples")
    parser.add_argument("--top-p", type=float, help="sampling: nucleus probability mass (default 1: all)")
    parser.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens (default 0: all)")
    parser.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeats (default 1)")
    parser.add_argument("--seed", type=int, help="sampling: the same seed gives the same answers")


def _add_generate(sub: Subparsers) -> None:
    generate = sub.add_parser("generate", help="answer a prompt with a run's model (or the base, or both)")
    generate.add_argument("run_dir", help="a run directory (runs/<name>-<timestamp>)")
    given = generate.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="the prompt, rendered as the run's training prompts were")
    given.add_argument("--data", help="a data file: answer every row, write --out (prompt, reference, output)")
    which = generate.add_mutually_exclusive_group()
    which.add_argument("--base", action="store_true", help="answer with the base model alone")
    which.add_argument("--compare", action="store_true", help="answer with the base and the fine-tuned model")
    generate.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.jsonl"),
        help="where --data writes answers (default predictions.jsonl)",
    )
    generate.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    _sampling_options(generate)
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    generate.set_defaults(handler=cmd_generate)


def _add_chat(sub: Subparsers) -> None:
    chat = sub.add_parser("chat", help="talk with a run's causal LM (/base, /reset; Ctrl-D ends)")
    chat.add_argument("run_dir", help="a run directory (runs/<name>-<timestamp>)")
    _sampling_options(chat)
    chat.set_defaults(handler=cmd_chat)


def _add_export(sub: Subparsers) -> None:
    export = sub.add_parser("export", help="a folder plain transformers loads, checked against the run")
    export.add_argument("run_dir", help="a run directory (runs/<name>-<timestamp>)")
    export.add_argument("--out", required=True, help="a new or empty folder")
    export.add_argument("--dtype", choices=checks.EXPORT_DTYPES, help="weights dtype (default: the run's, fp32 on CPU)")
    export.add_argument("--adapter-only", action="store_true", help="write the PEFT adapter and the card, unmerged")
    export.add_argument("--json", action="store_true", help="one JSON object on stdout")
    export.set_defaults(handler=cmd_export)


def _add_run(sub: Subparsers) -> None:
    run = sub.add_parser("run", help="train a preset", description="Train, evaluate and save a run.")
    run.add_argument("preset", nargs="?", help="preset file or bundled preset name (see `finetui presets`)")
    run.add_argument("--model", help="model id (short for --set model.id=M)")
    run.add_argument("--strategy", help="strategy kind (short for --set strategy.kind=S)")
    run.add_argument("--set", action="append", default=[], metavar="K=V", help=SET_HELP)
    run.add_argument(
        "--nproc", type=int, default=None, metavar="N", help="training processes, one per GPU (--set train.nproc=N)"
    )
    run.add_argument("--output-dir", type=Path, default=None, help="parent of the run directory (train.output_dir)")
    run.add_argument("--json", action="store_true", help="JSON lines of events on stdout")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped or interrupted run from its last checkpoint (--set may change train.epochs, "
        "max_steps, eval_steps, eval_batch_size, logging_steps, save_steps, save_total_limit)",
    )
    run.add_argument(
        "--detach", action="store_true", help="run in the background, immune to a closed terminal; prints the run dir"
    )
    run.add_argument("--detached-child", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run)


def _add_attach(sub: Subparsers) -> None:
    attach = sub.add_parser("attach", help="follow a (detached) run live; Ctrl-C stops it")
    attach.add_argument("run_dir", help="a run directory (printed by `finetui run --detach`)")
    attach.add_argument("--json", action="store_true", help="JSON lines of events on stdout")
    attach.set_defaults(handler=cmd_attach)


def _add_inspect(sub: Subparsers) -> None:
    inspect = sub.add_parser("inspect", help="freeze map and memory estimate, without training")
    inspect.add_argument("preset", nargs="?", help="preset file or bundled preset name")
    inspect.add_argument("--model", help="model id: hub id, local dir, .gguf file or builtin:NAME")
    inspect.add_argument("--strategy", help="strategy kind (short for --set strategy.kind=S)")
    inspect.add_argument("--set", action="append", default=[], metavar="K=V", help=SET_HELP)
    inspect.add_argument("--json", action="store_true", help="one JSON object on stdout")
    inspect.set_defaults(handler=cmd_inspect)


def _add_data(sub: Subparsers) -> None:
    data = sub.add_parser(
        "data",
        help="report the data a preset trains on (rows, labels, lengths, leaks), without loading weights",
        description="Report the data a run would see: rows and why some are left out, labels, token lengths, "
        "one rendered example, duplicates and rows shared with train. Exit 2 when `run` would refuse it.",
    )
    data.add_argument("preset", nargs="?", help="preset file or bundled preset name")
    data.add_argument("--model", help="model id whose tokenizer is used (short for --set model.id=M)")
    data.add_argument("--set", action="append", default=[], metavar="K=V", help=SET_HELP)
    data.add_argument("--json", action="store_true", help="one JSON object on stdout")
    data.set_defaults(handler=cmd_data)


def _add_eval(sub: Subparsers) -> None:
    evaluate = sub.add_parser("eval", help="score a run's model on a data file")
    evaluate.add_argument("run_dir", help="a run directory (runs/<name>-<timestamp>)")
    evaluate.add_argument("--data", required=True, help="data file (csv, tsv, json, jsonl, parquet) or hub id")
    evaluate.add_argument("--set", action="append", default=[], metavar="K=V", help=SET_HELP)
    evaluate.add_argument("--json", action="store_true", help="one JSON object of metrics on stdout")
    evaluate.add_argument(
        "--generate", action="store_true", help="causal runs: generate each row's answer and score it (see --metric)"
    )
    evaluate.add_argument(
        "--metric", choices=METRICS, help="--generate: how answers are scored (default: from the references)"
    )
    evaluate.add_argument("--base", action="store_true", help="--generate: score the base model on the same rows too")
    evaluate.add_argument("--batch-size", type=int, default=16, help="--generate: prompts generated together")
    _sampling_options(evaluate)
    evaluate.set_defaults(handler=cmd_eval)


def _add_presets(sub: Subparsers) -> None:
    presets = sub.add_parser("presets", help="list the bundled presets")
    presets.add_argument("--keys", action="store_true", help="list every preset key with its default")
    presets.set_defaults(handler=cmd_presets)


def _add_diff(sub: Subparsers) -> None:
    diff = sub.add_parser("diff", help="what differs between two runs (config, environment, data, results)")
    diff.add_argument("run_a", help="a run directory")
    diff.add_argument("run_b", help="another run directory")
    diff.add_argument("--json", action="store_true", help="one JSON object: config, environment, data, metrics, loss")
    diff.set_defaults(handler=cmd_diff)


def _add_rerun(sub: Subparsers) -> None:
    rerun = sub.add_parser("rerun", help="train again with a run's recorded config; warns about what changed since")
    rerun.add_argument("run_dir", help="a run directory")
    rerun.add_argument("--output-dir", type=Path, default=None, help="parent of the new run (default: the run's)")
    rerun.add_argument("--json", action="store_true", help="JSON lines of events on stdout")
    rerun.set_defaults(handler=cmd_rerun)


SUBCOMMAND_PARSERS = (
    _add_run,
    _add_attach,
    _add_inspect,
    _add_data,
    _add_eval,
    _add_generate,
    _add_chat,
    _add_export,
    _add_diff,
    _add_rerun,
    _add_presets,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetui", description="Fine-tune language models: headless commands.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMAND_PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        sys.stderr.write(f"finetui: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("finetui: interrupted\n")
        return EXIT_STOPPED
    except Exception as exc:
        if os.environ.get("FINETUI_DEBUG"):
            raise
        sys.stderr.write(
            f"finetui: internal error: {type(exc).__name__}: {exc} (FINETUI_DEBUG=1 shows the traceback)\n"
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
