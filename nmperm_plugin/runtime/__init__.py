"""How a run executes: layers onloaded to a device (:mod:`.onload`), several ``torch.distributed``
ranks (:mod:`.distributed`) and resumable state (:mod:`.resume`), plugged into the learner as
callbacks."""
