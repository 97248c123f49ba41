"""``python -m gradc``: the ``gradc`` command, for when the script is not on ``PATH``."""

from .cli import main

main(prog_name="gradc")
