"""`python -m lifecycle.compare [overrides]` (also `lifecycle compare`)."""
from lifecycle.cli import stage_entry

main = stage_entry("compare")

if __name__ == "__main__":
    main()
