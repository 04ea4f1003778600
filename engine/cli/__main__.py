"""``python -m engine.cli`` runs the ``plansim`` command."""

from engine.cli import main

main()
