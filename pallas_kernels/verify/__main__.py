import sys

from pallas_kernels.verify import main

sys.exit(main())
