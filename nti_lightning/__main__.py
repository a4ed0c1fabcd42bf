"""`python -m nti_lightning ...` is the `nti` command (e.g. `python -m nti_lightning fit --config FILE`)."""

from nti_lightning.cli import main

if __name__ == "__main__":
    main()
