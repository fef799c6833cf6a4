"""`python -m lifecycle.evaluate [overrides]` (also `lifecycle evaluate`)."""
from lifecycle.cli import stage_entry

main = stage_entry("evaluate")

if __name__ == "__main__":
    main()
