"""`python -m lifecycle.optimize [overrides]` (also `lifecycle optimize`)."""
from lifecycle.cli import stage_entry

main = stage_entry("optimize")

if __name__ == "__main__":
    main()
