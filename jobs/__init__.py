"""Thin entry points: `python jobs/<job>.py` or `python -m jobs.<job>`; the logic lives in lib/pcbvlm."""
