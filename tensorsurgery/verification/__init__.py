"""Stage 5, proving: an output file against its expected bytes, in both verify modes."""
