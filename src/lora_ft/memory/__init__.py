"""Memory: the planner's model of a training step's peak memory from the config alone (``shape`` → ``activations``
→ ``estimate``), the launch policy built on it (``auto`` micro-batch and gradient checkpointing), and ``lora-ft
plan``'s report."""
