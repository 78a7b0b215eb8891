"""Shims: `python jobs/<job>.py` runs `pcbvlm.commands.<job>` (the `pcbvlm` command line; README "Architecture")."""
