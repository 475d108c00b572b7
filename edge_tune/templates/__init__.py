"""Chat templates: the built-in ones (:mod:`.builtin`), which one a command uses
(:mod:`.choice`) and whether a template's special tokens are in a model's vocabulary
(:mod:`.vocabulary`). Pure package: no heavy imports."""
