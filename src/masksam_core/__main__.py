"""``python -m masksam_core`` runs the command line (also what ``torchrun -m masksam_core`` starts)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
