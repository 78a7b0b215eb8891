"""`python -m pcbvlm <command> ...`: the same as the `pcbvlm` console script (pcbvlm.commands)."""

from pcbvlm.commands import main

main()
