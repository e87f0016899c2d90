"""Conversion of Hugging Face MoE checkpoints into jaxmoe model directories.

`python -m convert HF_DIR OUT_DIR`. Imports `jaxmoe` (config, model state layout, checkpoint
layout); nothing in `jaxmoe` imports this package.
"""
