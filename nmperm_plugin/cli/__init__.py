"""The ``nmperm`` command (:mod:`.commands`), its flags built from the configuration schema
(:mod:`.options`) and ``nmperm demo`` (:mod:`.demo`)."""

from .commands import main

__all__ = ["main"]
