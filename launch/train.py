"""`accelerate launch launch/train.py --fold 3 [options]`: the training command of the installed cxrdist package
(cxrdist.train.cli), kept at this path for launchers and cluster scripts that take a file."""
from cxrdist.train.cli import main

if __name__ == "__main__":
    main()
