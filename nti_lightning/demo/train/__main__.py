"""`python -m nti_lightning.demo.train`: the same as `nti train-demo`."""

from nti_lightning.demo.train.run import main

main()
