"""The built-in CPU demo: a forgetting testbed for CaMOPD vs vanilla MOPD (``python -m camopd_megatron.demo``).

``tasks`` (synthetic general/domain skills with graded checkers), ``teachers`` (stages 1-2: the
general and the domain teacher, cached), ``study`` (the conflict check and stage 3 through the trainer + the report),
``probe`` (the evaluation hook: accuracy and the branch-conflict gradient cosine), ``plots``.
"""
