"""`python -m lifecycle.cost [overrides]` (also `lifecycle cost`)."""
from lifecycle.cli import stage_entry

main = stage_entry("cost")

if __name__ == "__main__":
    main()
