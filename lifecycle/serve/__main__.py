"""`python -m lifecycle.serve [overrides]` (also `lifecycle serve`)."""
from lifecycle.cli import stage_entry

main = stage_entry("serve")

if __name__ == "__main__":
    main()
