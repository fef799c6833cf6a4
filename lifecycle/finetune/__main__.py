"""`python -m lifecycle.finetune [overrides]` (also `lifecycle finetune`)."""
from lifecycle.cli import stage_entry

main = stage_entry("finetune")

if __name__ == "__main__":
    main()
