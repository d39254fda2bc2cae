"""The plugin system: pluggy hook specifications (:mod:`.hooks`), the registry that looks names up
(:mod:`.registry`) and the built-in plugin (:mod:`.builtin`)."""
