"""What a trained model is used for: ``distlm generate``, ``distlm eval`` and ``distlm finetune-classify``.

Each module loads a checkpoint through :mod:`distlm.checkpoint.pretrained` (any layout, one
process, a CPU or a GPU) and owns its command's arguments (``add_arguments``) and entry point
(``run``). Nothing heavy is imported at module level: ``distlm --help`` stays fast.
"""
