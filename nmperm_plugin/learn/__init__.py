"""Finding permutations: the learner (:mod:`.learner`), the losses it minimises (:mod:`.losses`),
the objectives that walk a model's layers (:mod:`.objectives`, :mod:`.run`), the pipeline that runs
one (:mod:`.pipeline`) and the fold that absorbs the result into the model (:mod:`.fold`)."""
