"""`python -m lifecycle.data [overrides]` (also `lifecycle data`)."""
from lifecycle.cli import stage_entry

main = stage_entry("data")

if __name__ == "__main__":
    main()
