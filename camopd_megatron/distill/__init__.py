"""CaMOPD algorithm pieces (docs/algorithm.md §2–§6, §8), importable one by one without megatron.

- :mod:`~camopd_megatron.distill.losses`: the branch loss (truncated IS, r_i, adv clip, global
  normaliser) and the top-k reverse KL.
- :mod:`~camopd_megatron.distill.selection`: global ρ-mass sample selection and per-sample r_i.
- :mod:`~camopd_megatron.distill.scheduler`: alternating / mixed branch schedule (pure Python).
- :mod:`~camopd_megatron.distill.diagnostics`: branch conflict and gradient coherence on sharded grads.

Nothing is imported here, so ``import camopd_megatron.distill.scheduler`` stays torch-free.
"""
