"""``nlplatform eval CHECKPOINT --suite NAME [flags]``: each suite with its own argument parser.

``--suite`` is read first (default ``commonsense``), then the whole command line is parsed by that suite's parser, so
a suite has exactly the flags it uses:

- the lm-eval suites (``evals/suites/<name>.yaml``: commonsense, smoke, extended): ``--tasks`` (lm-eval tasks),
  ``--limit``, ``--batch-size``, ``--dtype``;
- ``long_context``: ``--probes`` (probe tasks), ``--lengths``, ``--depths``, ``--limit``, ``--seed``;
- ``continual``: ``--protocol``, ``--domains``, ``--class-tasks``, ``--stage-steps``, ``--mode``, ``--limit``,
  ``--seed``;

and every suite ``--device`` and ``--no-track``. A flag the chosen suite does not take is refused in one line that
names the flags it does take, with exit status 2 (as every parse error); ``nlplatform eval CHECKPOINT --suite NAME
--help`` lists them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace

DEFAULT_SUITE = "commonsense"
MEMORY_SUITES = ("long_context", "continual")  # every other suite is an lm-eval suite, evals/suites/<name>.yaml
PROG = "nlplatform eval"


class SuiteParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``nlplatform eval: error: ...``, exit status 2). ``parse_args``
    refuses words it does not know by naming the flags the ``suite`` takes; ``hints`` say where a flag of another
    suite went (``{"--tasks": "the probe tasks are --probes"}``)."""

    def __init__(self, *, suite: str = "", hints: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(prog=PROG, allow_abbrev=False, **kwargs)
        self.suite, self.hints = suite, hints or {}

    def flags(self) -> list[str]:
        """The suite's flags (the longest spelling of each; help left out)."""
        return [max(a.option_strings, key=len) for a in self._actions if a.option_strings and a.dest != "help"]

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self._refusal(unknown))
        return namespace

    def _refusal(self, words: list[str]) -> str:
        flags = list(dict.fromkeys(w.split("=", 1)[0] for w in words if w.startswith("-")))
        if not flags:
            return f"unexpected argument(s) {' '.join(map(repr, words))}"
        hints = [self.hints[f] for f in flags if f in self.hints]
        hint = f" ({'; '.join(hints)})" if hints else ""
        return f"--suite {self.suite} takes no {', '.join(flags)}{hint}; its flags: {', '.join(self.flags())}"

    def error(self, message: str):  # argparse prints the usage first; the refusal names the flags instead
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` (the words after ``eval``) parsed by the parser of the suite its ``--suite`` names."""
    first = SuiteParser(add_help=False)
    first.add_argument("--suite", default=DEFAULT_SUITE)
    suite = first.parse_known_args(argv)[0].suite
    from nlplatform.eval.harness.tasks import suite_names
    from nlplatform.validate import suggest

    known = [*suite_names(), *MEMORY_SUITES]
    if suite not in known:
        first.error(f"unknown suite {suite!r}.{suggest(suite, known)} Suites: {', '.join(known)}")
    return suite_parser(suite).parse_args(argv)


def suite_parser(suite: str) -> SuiteParser:
    """The parser of ``suite``: the checkpoint, ``--suite``, the suite's own flags, ``--device`` and ``--no-track``;
    its ``run`` default is the function that runs the suite."""
    build = {"long_context": _long_context_flags, "continual": _continual_flags}.get(suite, _harness_flags)
    parser = build(suite)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-track", action="store_true", help="do not log into the checkpoint's MLflow run")
    return parser


def _parser(
    suite: str,
    description: str,
    run: Callable[[argparse.Namespace], int],
    suite_help: str,
    hints: dict[str, str] | None = None,
) -> SuiteParser:
    parser = SuiteParser(suite=suite, hints=hints, description=description)
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a training checkpoint (.ckpt), or a folder of `nlplatform export`"
    )
    parser.add_argument("--suite", default=suite, metavar="NAME", help=suite_help)
    parser.set_defaults(run=run)
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _numbers(kind: type) -> Callable[[str], list]:
    def numbers(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return numbers


# ------------------------------------------------------------------------------------------- lm-eval suites


def _harness_flags(suite: str) -> SuiteParser:
    from nlplatform.eval.harness.tasks import suite_names

    parser = _parser(
        suite,
        "Score a checkpoint with lm-eval-harness on an offline suite; the paper's row, results JSON beside it. "
        "The suites long_context and continual take their own flags: nlplatform eval CHECKPOINT --suite "
        "long_context --help (or continual).",
        _run_harness,
        f"an lm-eval suite, evals/suites/<name>.yaml: {', '.join(suite_names())} (default {DEFAULT_SUITE}); "
        f"or {' or '.join(MEMORY_SUITES)}",
    )
    parser.add_argument(
        "--tasks",
        type=_names,
        default=None,
        help="comma-separated lm-eval tasks instead of the suite's (its settings stay)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="items per task (default: the suite's; all for commonsense)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, float64")
    return parser


def _run_harness(args: argparse.Namespace) -> int:
    from nlplatform.eval.harness.tasks import check_tasks, load_suite

    suite = load_suite(args.suite)  # unknown tasks fail before the heavy imports below
    if args.tasks:
        check_tasks(args.tasks)
    from nlplatform.eval.harness.suite import evaluate, format_row
    from nlplatform.eval.report import announce

    result = evaluate(
        args.checkpoint,
        suite,
        tasks=args.tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        track=not args.no_track,
    )
    announce(result, format_row(result.row), "eval/<task>/<metric>")
    return 0


# ------------------------------------------------------------------------------------------- long_context


def _long_context_flags(suite: str) -> SuiteParser:
    from nlplatform.eval.long_context.probes import TASKS

    parser = _parser(
        suite,
        "Needle-in-a-haystack and passkey probes at and beyond the trained length, and the loss by position; "
        "results JSON and plots beside the checkpoint.",
        _run_long_context,
        "long_context (the flags below are this suite's)",
        hints={"--tasks": "the probe tasks are --probes"},
    )
    parser.add_argument(
        "--probes",
        type=_names,
        default=None,
        help=f"comma-separated probe tasks (default: one per needle kind, each variant on numbers, "
        f"and passkey; all: {', '.join(TASKS)})",
    )
    parser.add_argument(
        "--lengths",
        type=_numbers(int),
        default=None,
        help="comma-separated context lengths (default: 1, 2, 4, 8 and 16 x the trained one)",
    )
    parser.add_argument(
        "--depths",
        type=_numbers(float),
        default=None,
        help="comma-separated needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)",
    )
    parser.add_argument("--limit", type=int, default=None, help="probes per task, length and depth (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="the probes' seed (default 0)")
    return parser


def _run_long_context(args: argparse.Namespace) -> int:
    from nlplatform.eval.long_context.suite import evaluate_long_context, format_summary
    from nlplatform.eval.report import announce

    result = evaluate_long_context(
        args.checkpoint,
        tasks=args.probes,
        lengths=args.lengths,
        depths=args.depths,
        limit=args.limit,
        seed=args.seed,
        device=args.device,
        track=not args.no_track,
    )
    announce(result, format_summary(result.metrics), "eval/long_context/...")
    return 0


# ------------------------------------------------------------------------------------------- continual


def _continual_flags(suite: str) -> SuiteParser:
    parser = _parser(
        suite,
        "Learn text domains and intent classes one after the other from the checkpoint, measure what is forgotten; "
        "results JSON and plots beside the checkpoint.",
        _run_continual,
        "continual (the flags below are this suite's)",
    )
    parser.add_argument(
        "--protocol",
        default="both",
        choices=["both", "domains", "classes"],
        help="text domains one after the other, class-incremental intents, or both (default)",
    )
    parser.add_argument(
        "--domains",
        type=_names,
        default=None,
        help="comma-separated domains in training order "
        "(default encyclopedia,howto,fiction; also science, social, physical)",
    )
    parser.add_argument(
        "--class-tasks",
        type=_names,
        default=None,
        help="comma-separated intent tasks in training order (default banking,travel,home; also food, work)",
    )
    parser.add_argument(
        "--stage-steps", type=int, default=None, help="fine-tuning steps per domain or intent task (default 50)"
    )
    parser.add_argument(
        "--mode",
        default="both",
        choices=["both", "frozen", "ttl"],
        help="held-out text read window by window (frozen), as one stream (ttl), or both (default)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="held-out windows per domain and test utterances per intent (default 16 each)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the stages' seed (default 0)")
    return parser


def _run_continual(args: argparse.Namespace) -> int:
    from nlplatform.eval.continual.suite import MODES, PROTOCOLS, ContinualSettings, evaluate_continual, format_summary
    from nlplatform.eval.report import announce

    settings = ContinualSettings(
        modes=MODES if args.mode == "both" else (args.mode,),
        protocols=PROTOCOLS if args.protocol == "both" else (args.protocol,),
        seed=args.seed,
    )
    if args.domains is not None:
        settings = replace(settings, domains=tuple(args.domains))
    if args.class_tasks is not None:
        settings = replace(settings, class_tasks=tuple(args.class_tasks))
    if args.stage_steps is not None:
        settings = replace(settings, stage_steps=args.stage_steps)
    if args.limit is not None:
        settings = replace(settings, eval_windows=args.limit, test_per_label=args.limit)
    result = evaluate_continual(args.checkpoint, settings, device=args.device, track=not args.no_track)
    announce(result, format_summary(result.metrics), "eval/continual/...")
    return 0


# ------------------------------------------------------------------------------------------- the eval command


class _SuiteWords(argparse.Action):
    """The ``eval`` command's one argument, every word after ``eval``: parsed by the chosen suite's parser, whose
    values land in the namespace."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for key, value in vars(parse(list(values))).items():
            setattr(namespace, key, value)


def add_command(commands) -> None:
    """Add ``eval`` to ``nlplatform``'s subcommands (``commands``, from ``add_subparsers``)."""
    # No word is an option of this parser (prefix_chars is NUL, which no argument holds), so every word, flags and
    # -h included, reaches the suite's parser in its order; that parser checks them.
    parser = commands.add_parser(
        "eval",
        help="score a checkpoint on a suite (lm-eval suites, long_context, continual), results beside it",
        add_help=False,
        prefix_chars="\0",
    )
    parser.add_argument("words", nargs=argparse.REMAINDER, action=_SuiteWords)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the suite ``args`` were parsed for."""
    return args.run(args)
