"""Reading and writing models: the loader (:mod:`.models`), checkpoints and their verification
(:mod:`.checkpoint`), the sidecar (:mod:`.sidecar`), where nmperm may write (:mod:`.safety`) and
the checks of the numbers it reads and writes (:mod:`.checks`)."""
