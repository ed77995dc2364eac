import sys

from nlplatform.cli import main

sys.exit(main())
