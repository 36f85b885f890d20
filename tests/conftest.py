import os
import sys

# Tests import the project as top-level packages (model, kernels, tracking), like train.py does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
