"""Evaluation of checkpoints: ``nlplatform eval CHECKPOINT --suite NAME``, three suites with their own flags.

- ``harness/``: lm-eval-harness on offline benchmarks (the suites of ``evals/suites/``: commonsense, smoke,
  extended), its model adapter, tasks and eval data, and lm-eval's own command line (``python -m
  nlplatform.eval.harness``);
- ``long_context/``: needle-in-a-haystack and passkey probes, loss by position;
- ``continual/``: text domains and intent classes learned one after the other, forgetting.

What they share: ``report.py`` (the results JSON beside the checkpoint, MLflow, figures, the command's output),
``checkpoint.py`` (the model on the default device, the held-out split of its corpus) and ``reader.py`` (a prompt
read once, continuations scored from copies of the state). ``command.py`` is the command line: one parser per suite.
"""
