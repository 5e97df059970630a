import sys

from loom_ros.cli import main

sys.exit(main())
