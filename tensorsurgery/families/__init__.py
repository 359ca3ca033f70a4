"""Model-family knowledge as data: layer places, rename presets, layer arrangements, config.json rewrites and checks."""
