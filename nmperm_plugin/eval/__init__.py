"""Evaluation: perplexity and the ``nmperm eval`` report (:mod:`.perplexity`), zero-shot accuracy
through lm-evaluation-harness with the offline task files in ``tasks/`` (:mod:`.zeroshot`)."""
