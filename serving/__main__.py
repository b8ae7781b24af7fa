import sys

from serving.server import main

sys.exit(main(sys.argv[1:]))
