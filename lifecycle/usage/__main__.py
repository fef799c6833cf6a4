"""`python -m lifecycle.usage [overrides]` (also `lifecycle usage`)."""
from lifecycle.cli import stage_entry

main = stage_entry("usage")

if __name__ == "__main__":
    main()
