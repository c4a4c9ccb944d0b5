"""``python -m bulwark.cli``: how bulwark up and the tests start each component."""

from bulwark.cli import main

main()
