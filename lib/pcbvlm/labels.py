"""The DeepPCB defect classes: the one place their ids and names are written."""

from __future__ import annotations

# DeepPCB annotation class id -> name (0 is background and never appears in annotations).
CLASS_NAMES: dict[int, str] = {
    1: "open",
    2: "short",
    3: "mousebite",
    4: "spur",
    5: "copper",
    6: "pin-hole",
}
LABELS: tuple[str, ...] = tuple(CLASS_NAMES.values())
LABEL_TO_ID: dict[str, int] = {name: cid for cid, name in CLASS_NAMES.items()}
