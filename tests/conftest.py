import os
import sys

# Tests run on CPU. Tiny shapes make XLA's compile time, not run time, the cost: compile with less
# backend optimisation (numerics are unchanged). Multi-device tests spawn subprocesses (they inherit this).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
sys.path.insert(0, os.path.dirname(__file__))
