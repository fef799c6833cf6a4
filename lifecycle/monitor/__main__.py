"""`python -m lifecycle.monitor [overrides]` (also `lifecycle monitor`)."""
from lifecycle.cli import stage_entry

main = stage_entry("monitor")

if __name__ == "__main__":
    main()
