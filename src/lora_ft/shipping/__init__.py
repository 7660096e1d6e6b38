"""Shipping a finished run: merging with a measured fidelity, the Hub folder and model card, and inference
(chat, generate, predict)."""
