import os

# Tests run on CPU; multi-device tests spawn their own subprocesses with fake devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
