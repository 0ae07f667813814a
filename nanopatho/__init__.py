"""nanopatho: a small, readable, tested implementation of the Patho-R1 recipe.

Modules (one concept each): vit, lm, vlm, clip (models); tokenizer, data, prompts
(inputs); rl, rewards, kernels (reinforcement learning); training, config, dist,
checkpoint (the loop's plumbing); evaluate, generate, classify (using a checkpoint).
"""

__version__ = "0.1.0"
