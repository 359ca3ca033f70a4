"""Stage 3, pure: (Manifest, Checkpoints) -> Plan, every output tensor a recipe of inputs and one operation."""
