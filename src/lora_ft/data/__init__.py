"""Data: reading splits, rendering chat data, tokenizing through the objective, batching indices, augmentation.

Never imports model code (it needs a tokenizer at most) nor the objectives (they are passed in).
"""
