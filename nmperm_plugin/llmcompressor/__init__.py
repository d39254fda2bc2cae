"""llm-compressor integration: :class:`~.modifier.LearnedPermutationModifier`, its glue to
llm-compressor's pipelines (:mod:`.compress`) and ``nmperm prune --recipe`` (:mod:`.recipe`)."""
