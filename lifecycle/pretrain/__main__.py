"""`python -m lifecycle.pretrain [overrides]` (also `lifecycle pretrain`)."""
from lifecycle.cli import stage_entry

main = stage_entry("pretrain")

if __name__ == "__main__":
    main()
