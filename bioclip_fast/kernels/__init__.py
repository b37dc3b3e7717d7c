"""Triton kernels of the fused contrastive losses (CLIP InfoNCE, SigLIP): forward and backward, never B x B.

One loss per file, kernel then host launchers: ``clip_loss`` and ``siglip_loss`` (the forward kernels and the
launchers ``bioclip_fast.ops.dispatch`` calls). Below them, by what they hold:

* ``tiles``: Triton JIT helpers shared by every kernel (tile products, probabilities against stored LSEs);
* ``autotune``: tile configs per feature width, pruning, the autotuned wrappers and the launcher;
* ``backward``: picks the backward strategy and runs it: ``backward_fused`` (one kernel launched for dQ and for
  dK) or ``backward_gemm`` (a gradient-tile kernel + cuBLAS: ``gemm``, ``gemm2d``);
* ``planner``: pure Python (no triton, no torch): memory plans, the strategy choice, FLOP counts;
* ``operands`` (chunk casts, scale-gradient centres), ``validation`` (launcher input checks), ``precision``
  (``tl.dot`` input precision; torch only), ``settings`` (environment switches; stdlib only);
* ``_aot``: ``python -m bioclip_fast.kernels._aot``, the sm_90a compile report without a GPU.

Nothing here imports the rest of the package (layer 1); ``bioclip_fast.ops`` builds on it.
"""
