"""`python -m lifecycle.pipeline [overrides]` (also `lifecycle pipeline`)."""
from lifecycle.cli import stage_entry

main = stage_entry("pipeline")

if __name__ == "__main__":
    main()
