"""``python -m nlplatform.eval.harness ARGS``: lm-eval's own command line, with our model and our offline tasks.

lm-eval discovers no model plugins by itself, so this entry point registers the ``nlplatform`` model (the adapter in
``adapter.py``), writes the task YAMLs of ``evals/tasks`` for this machine (fetching the eval data
on first use) and adds them with ``--include_path`` unless one is given; every other argument goes to lm-eval
unchanged, so all of its options work. For example::

    python -m nlplatform.eval.harness --model nlplatform --model_args pretrained=runs/tiny/RUN/checkpoints/last.ckpt \\
        --tasks piqa,arc_easy --limit 20 --batch_size 16

The held-out corpus task is available when ``pretrained=`` names a checkpoint or an exported folder (its recipe
says which corpus). lm-eval's own backends stay available: ``--model hf --model_args
pretrained=FOLDER,trust_remote_code=True`` scores a folder of ``nlplatform export`` through ``transformers``, the
standard cross-check of our adapter.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nlplatform.errors import UserError


def _arg(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _include_path(argv: list[str]) -> Path:
    """Render every task YAML (with data paths for this machine) and return their folder; the held-out corpus task
    too when ``pretrained=`` names a checkpoint or an exported folder (its recipe says which corpus)."""
    from nlplatform.data import cache_root
    from nlplatform.eval.harness.tasks import prepare_tasks

    model_args = _arg(argv, "--model_args") or ""
    pretrained = dict(kv.split("=", 1) for kv in model_args.split(",") if "=" in kv).get("pretrained")
    data = None
    if pretrained:
        from nlplatform.checkpoint import load_checkpoint

        data = load_checkpoint(pretrained).recipe.data
    return prepare_tasks(cache_root() / "eval" / "lm_eval_cli", data)


def main(argv: list[str] | None = None) -> int:
    # lm-eval registers its own backends (hf, vllm, ...) only when it finds its registry empty: load them first, or
    # registering ours would hide them
    import lm_eval.models  # noqa: F401

    import nlplatform.eval.harness.adapter  # noqa: F401  (registers the "nlplatform" model with lm-eval)

    argv = list(sys.argv[1:] if argv is None else argv)
    from lm_eval.__main__ import cli_evaluate

    try:
        if _arg(argv, "--include_path") is None and argv and argv[0] not in ("-h", "--help"):
            argv += ["--include_path", str(_include_path(argv))]
        sys.argv = ["lm_eval", *argv]
        cli_evaluate()
    except UserError as exc:  # a bad checkpoint, missing eval data: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
