"""`python -m cxrdist.train` / `accelerate launch -m cxrdist.train`: the training command."""
from cxrdist.train.cli import main

if __name__ == "__main__":
    main()
